"""One speculative decoding step: a proposer guesses, the target verifies in one forward call.

Every strategy in refinfer/decoding/ is a Proposer plugged into `step` (DESIGN.md, "the one
forward call"); plain decoding is the Proposer that proposes nothing. A step:

    proposal = proposer.propose(state, k)        branches: candidate continuations, <= k tokens
    one forward call over [pending] + branch     for every branch, on a fork of the sequence,
                     + the proposal's side chunks   (lookahead's Jacobi window), all at once
    verdict = verify(...)                        the accepted tokens + the target's own next one
    keep the winning branch, truncate it         pool.truncate rolls back rejected tokens,
                                                 pool.free drops the losing forks
    proposer.observe(state, verdict.tokens, side_logits)

The pending token is the last accepted one: it is known but not yet in the pool, so every
step starts by running it. A single branch is appended to the sequence itself; several are
forks (pool.fork shares the prefix blocks; copy-on-write copies just a partial last block).

`DraftLength` adapts k: it grows while whole proposals are accepted, shrinks to what was
accepted on an early rejection, and pauses proposing (plain steps) while speculation costs
more than it saves, so a strategy that does not fit the text costs little more than plain
decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refinfer.decoding.verify import Verdict, verify
from refinfer.kv_pool import KVPool
from refinfer.model import Batch, Model
from refinfer.sampling import Sampler


@dataclass
class DecodeState:
    """What a decoding step reads and advances: the target, its pool sequence, the tokens."""

    model: Model
    pool: KVPool
    seq: int  # the pool sequence holding history[:-1]: every accepted token but the pending one
    history: list[int]  # prompt + generated tokens; history[-1] is pending (not in the pool)
    sampler: Sampler  # the request's sampling parameters and seeded generator

    @property
    def pending(self) -> int:
        """The last accepted token, which the next forward call starts with."""
        return self.history[-1]


@dataclass
class Proposal:
    """What a proposer asks the target to verify in the next forward call."""

    branches: list[list[int]]  # candidate continuations after the pending token; [] = none
    draft_probs: list[np.ndarray] | None = None  # q_i of branches[0] (draft models only)
    side_chunks: list[tuple[int, list[int]]] = field(default_factory=list)  # extra (seq, ids)


class Proposer:
    """Proposes nothing: plain decoding. Strategies override propose/observe/close."""

    name = "plain"
    draft_cost = 0.0  # cost of proposing one token, in decoding steps of the target

    def propose(self, state: DecodeState, k: int) -> Proposal:
        """Branches of at most k tokens continuing state.history (longer ones are trimmed)."""
        return Proposal([])

    def observe(self, state: DecodeState, accepted: list[int], side_logits: list[np.ndarray]):
        """Learn from a step: the emitted tokens (already in state.history) and side logits.

        side_logits[i] is float32[len(tokens), V] for the proposal's i-th side chunk; empty
        when the step proposed nothing.
        """

    def extra_blocks(self, block_size: int) -> int:
        """Pool blocks this proposer needs beyond the accepted sequence and its k drafts."""
        return 0

    def close(self, state: DecodeState) -> None:
        """Free whatever the proposer holds (its own pool sequences)."""


@dataclass
class StepCounts:
    """Totals over the steps of one generation (the target's forward calls)."""

    forward_calls: int = 0  # target forward calls after the prefill, one per step
    proposed: int = 0  # proposed tokens the target checked (the longest branch per step)
    accepted: int = 0  # proposed tokens accepted
    emitted: int = 0  # tokens emitted by the steps (accepted + one per step, up to EOS)

    def add(self, proposed: int, accepted: int, emitted: int) -> None:
        """Count one step."""
        self.forward_calls += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += emitted

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Mean tokens emitted per target forward call."""
        return self.emitted / self.forward_calls if self.forward_calls else 0.0


def step(state: DecodeState, proposer: Proposer, k: int) -> tuple[Verdict, int, int]:
    """Run one step (module doc); return (verdict, tokens proposed, tokens run beyond pending).

    Tokens proposed is the longest branch; the tokens run also count every branch and the
    side chunks: what the step spent on speculation. With k = 0 the proposer is not asked
    (a plain step). state.seq may change (a fork wins); state.history grows by verdict.tokens.
    """
    proposal = proposer.propose(state, k) if k > 0 else Proposal([])
    branches = [b[:k] for b in proposal.branches if b] or [[]]
    pool, start = state.pool, state.pool.length(state.seq)
    seqs = [state.seq] if len(branches) == 1 else [pool.fork(state.seq) for _ in branches]
    chunks = [(s, [state.pending, *b]) for s, b in zip(seqs, branches, strict=True)]
    chunks += proposal.side_chunks
    batch = Batch.append(pool, chunks)
    logits = state.model.forward(batch, pool)  # one row per token
    rows = np.split(logits, np.cumsum([len(tokens) for _, tokens in chunks])[:-1])
    n = len(branches)
    verdict = verify(branches, rows[:n], state.sampler, state.history, proposal.draft_probs)
    winner = seqs[verdict.branch]
    if winner != state.seq:  # forked: the winner replaces the sequence, the rest are freed
        for s in [state.seq, *seqs]:
            if s != winner:
                pool.free(s)
        state.seq = winner
    pool.truncate(winner, start + len(verdict.tokens))  # keep pending + the accepted tokens
    state.history += verdict.tokens
    proposer.observe(state, verdict.tokens, rows[n:])
    return verdict, max(len(b) for b in branches), len(batch.tokens) - 1


# What one more token in a forward call costs, in decoding steps (T = 1 forward calls): the
# weights are streamed once for all T tokens, so T tokens cost about 1 + VERIFY_COST (T - 1).
# Measured by bench/bench_decoding.py (its forward(T) / forward(1) table) on 2 threads.
VERIFY_COST = 0.2


@dataclass
class DraftLength:
    """How many tokens to propose next: adaptive, and paused while speculating does not pay.

    k grows by 2 after a fully accepted proposal (up to k_max) and shrinks to accepted + 1
    after an early rejection. Each step that speculated has a gain, tokens emitted per unit
    of cost, the cost counted in decoding steps:

        cost = 1 + VERIFY_COST * (tokens run beyond the pending one) + draft_cost * proposed

    A moving average of the gain below 1 means plain decoding would be faster here: propose
    nothing for `backoff` steps (doubling each time, up to 64), then try again; a step that
    pays resets the backoff. Deterministic: counts only, never the clock, so a seeded
    sampled generation repeats exactly.
    """

    k: int  # tokens to propose next
    k_max: int
    draft_cost: float = 0.0  # cost of drafting one token, in decoding steps of the target
    adaptive: bool = True  # False: propose k tokens every step, whatever they cost or gain
    gain: float = 1.0  # moving average of the gain, weight 0.3 on the newest step
    backoff: int = 4  # plain steps of the next pause
    paused: int = 0  # plain steps left in the current pause

    @property
    def can_pay(self) -> bool:
        """Whether speculating can ever beat plain decoding with this draft cost.

        A step of k drafts, all accepted, gains (k + 1) / (1 + (VERIFY_COST + draft_cost) k),
        below 1 for every k once VERIFY_COST + draft_cost >= 1: a draft that costs about as
        much as the target (another quantisation of it, or nearly all its layers) never pays.
        """
        return VERIFY_COST + self.draft_cost < 1

    def next_k(self) -> int:
        """Tokens to propose this step (0 while paused, and always when drafting cannot pay)."""
        if not self.adaptive:
            return self.k
        if not self.can_pay:
            return 0
        if self.paused:
            self.paused -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int, spent: int) -> None:
        """Adapt after a step that checked `proposed` tokens, accepted `accepted`, and ran
        `spent` tokens beyond the pending one (a lookahead window costs even without a branch).
        """
        if spent == 0 or not self.adaptive:
            return
        if proposed and accepted == proposed:
            self.k = min(self.k + 2, self.k_max)
        elif proposed:
            self.k = max(1, min(self.k - 1, accepted + 1))
        gain = (accepted + 1) / (1 + VERIFY_COST * spent + self.draft_cost * proposed)
        self.gain += 0.3 * (gain - self.gain)
        if gain >= 1:
            self.backoff = 4
        if self.gain < 1:
            self.paused, self.gain = self.backoff, 1.0  # after the pause, judge afresh
            self.backoff = min(2 * self.backoff, 64)
