"""The verifier: which proposed tokens the target model accepts. Every strategy shares it.

In the data flow it comes right after the one forward call of a decoding step. The target
has just run `[pending] + branch` for every proposed branch (a branch is a candidate
continuation: a draft model's tokens, an n-gram, the words after a match in the prompt).
Row i of a branch's logits is the target's next-token distribution after pending +
branch[:i], so every proposed token is checked at once, and the row after the last one
gives one more token for free.

Greedy (temperature 0): accept the longest prefix of a branch that equals the target's
argmax at each position, then the target's own argmax after it. These are exactly the
tokens plain greedy decoding emits one forward call at a time.

Sampled: speculative sampling (Leviathan et al. 2023; Chen et al. 2023). A token x drawn
from the draft's distribution q is accepted with probability min(1, p(x) / q(x)); on
rejection the token is drawn from the residual normalise(max(0, p - q)). Either way the
emitted token is distributed exactly as p. A deterministic proposer (n-gram, prompt match)
proposes x with q = one-hot(x): x is accepted with probability p(x), and the residual is p
without x. Several candidate tokens at one position (lookahead's n-grams) are tried in
turn, each against the residual the ones before left (SpecInfer's multi-candidate rule,
Miao et al. 2024), which keeps the emitted token ~ p. When a whole branch is accepted, one
bonus token is drawn from the row after it.

p and q both come from sampling.probabilities with the same SamplingParams and the same
previous tokens, so the repetition penalty, top-k/p, min-p and the temperature shape them
exactly as plain sampling shapes its distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from refinfer.sampling import Sampler, probabilities


@dataclass(frozen=True)
class Verdict:
    """What one step emits: the winning branch, then its accepted tokens + the target's own."""

    branch: int  # index of the branch whose prefix was accepted
    tokens: list[int]  # accepted proposed tokens, then one token of the target's

    @property
    def n_accepted(self) -> int:
        """How many proposed tokens were accepted (the last token is the target's own)."""
        return len(self.tokens) - 1


def verify(
    branches: Sequence[Sequence[int]],
    rows: Sequence[np.ndarray],
    sampler: Sampler,
    history: Sequence[int],
    draft_probs: Sequence[np.ndarray] | None = None,
) -> Verdict:
    """The tokens to emit after `history`, given the target's logits for every branch.

    rows[b] is float32[len(branches[b]) + 1, V]: row i follows history + branches[b][:i].
    draft_probs (one branch only) are the distributions q_i the draft drew branch[i] from;
    without them every proposed token counts as deterministic (q = one-hot).
    """
    if sampler.params.greedy:
        return verify_greedy(branches, rows, sampler, history)
    return verify_sampled(branches, rows, sampler, history, draft_probs)


def verify_greedy(
    branches: Sequence[Sequence[int]],
    rows: Sequence[np.ndarray],
    sampler: Sampler,
    history: Sequence[int],
) -> Verdict:
    """The longest accepted prefix over all branches (first branch on ties) + the argmax after.

    Uses no randomness: the same logits always give the same verdict.
    """
    best = Verdict(0, [])
    for b, (branch, logits) in enumerate(zip(branches, rows, strict=True)):
        tokens: list[int] = []
        for i in range(len(branch) + 1):
            tokens.append(sampler.sample(logits[i], [*history, *tokens]))  # the target's argmax
            if i == len(branch) or tokens[-1] != branch[i]:
                break
        if len(tokens) > len(best.tokens):
            best = Verdict(b, tokens)
    return best


def verify_sampled(
    branches: Sequence[Sequence[int]],
    rows: Sequence[np.ndarray],
    sampler: Sampler,
    history: Sequence[int],
    draft_probs: Sequence[np.ndarray] | None = None,
) -> Verdict:
    """Speculative sampling over the branches, position by position (see the module doc)."""
    params = sampler.params
    alive = list(range(len(branches)))  # the branches that agree with every accepted token
    tokens: list[int] = []
    while True:
        i = len(tokens)
        # every alive branch has seen the same tokens, so any of them gives the target's p here
        p = probabilities(rows[alive[0]][i], params, [*history, *tokens])  # (V,)
        proposals = _proposals_at(i, [branches[b] for b in alive], p.size, draft_probs)
        token, accepted = _sample_against(p, proposals, sampler)
        tokens.append(token)
        if not accepted:  # a residual or bonus token ends the step
            return Verdict(alive[0], tokens)
        alive = [b for b in alive if len(branches[b]) > i and branches[b][i] == token]


def _proposals_at(
    i: int, branches: Sequence[Sequence[int]], V: int, draft_probs: Sequence[np.ndarray] | None
) -> list[tuple[int, np.ndarray]]:
    """(x, q) for each distinct token the branches propose at position i, in branch order."""
    if draft_probs is not None:
        (branch,) = branches  # a draft model proposes a single branch
        return [(branch[i], draft_probs[i])] if i < len(branch) else []
    out: dict[int, np.ndarray] = {}
    for branch in branches:
        if i < len(branch) and branch[i] not in out:
            out[branch[i]] = np.zeros(V)  # (V,) q = one-hot(x)
            out[branch[i]][branch[i]] = 1.0
    return list(out.items())


def _sample_against(
    p: np.ndarray, proposals: Sequence[tuple[int, np.ndarray]], sampler: Sampler
) -> tuple[int, bool]:
    """(token ~ p, whether it was a proposed one): try each (x, q) in turn, then the residual."""
    for x, q in proposals:
        # accept x with probability min(1, p(x) / q(x))
        if sampler.rng.random() * q[x] < p[x]:
            return x, True
        # rejected: continue from the residual p <- normalise(max(0, p - q))
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        if total > 0:  # 0 only if p == q up to rounding, where rejection has probability ~0
            p = residual / total
    return sampler.draw(p), False
