"""Lookahead decoding (Fu et al. 2024): make n-grams by Jacobi iteration, verify them in one call.

Where it sits: a Proposer for the decoding step of decoding/speculative.py. Each step asks
`propose` for candidate continuations of the accepted text and for side chunks, runs
both in ONE model.forward call, lets the verifier accept a prefix of one candidate, and hands
the side chunks' logits back to `observe`. Nothing here touches a kernel or a mask.

Two branches share every forward call:

- The lookahead branch: a 2D window of guessed tokens, N-1 levels x W columns. Let x be the
  pending token (accepted, not yet in the pool) at position p. levels[j, i] guesses the
  token at position p + i + j; cell (0, 0) is x itself. One forward call is one Jacobi
  iteration: after each column's deepest token the model's argmax makes a new level,

      new[i] = argmax_v P(v | prefix, x, levels[0, 1..i], levels[1, i], ..., levels[N-2, i])

  which guesses position p + i + N-1. Each column read top to bottom, then its new token,
  is an n-gram over consecutive positions that the model itself produced:

      (levels[0, i], levels[1, i], ..., levels[N-2, i], new[i])

- The verification branch: the n-grams in the pool whose first token is x. Each one's
  other N-1 tokens are a candidate continuation, verified like a draft model's tokens.

The window for W = 4, N = 4 (a..k are guesses; positions are relative to p):

    position   0   1   2   3   4   5   6
    level 0    x   a   b   c
    level 1        d   e   f   g
    level 2            h   i   j   k
    new                    +   +   +   +      argmax after h, i, j, k

The paper's attention mask (as in LookaheadDecoding's j_make_causal_mask_multilevel and
llama.cpp's examples/lookahead) lets the token at (level j, column i) see the prefix, x,
levels[0, 1..i] and the cells above it in its column. Those are exactly the tokens of one
linear sequence, in position order, so each column is a FORK of the accepted sequence
(sharing every prefix block; copy-on-write copies its partial last block) with one side
chunk appended, and plain causal attention computes the paper's pattern:

    column 0:  prefix | x d h           -> new[0], position 3
    column 1:  prefix | x a e i         -> new[1], position 4
    column 2:  prefix | x a b f j       -> new[2], position 5
    column 3:  prefix | x a b c g k     -> new[3], position 6

Sequences rather than a custom mask: the pool, the Batch and the attention kernel stay as
they are (strategies never touch kernels), and K/V of different columns can never mix. The
price is recomputation: column i repeats x and levels[0, 1..i], W(W-1)/2 tokens more in all
than a mask, which runs each once. (A fork cannot start midway through a chunk of the same
call, so the columns cannot share level 0.)

Tokens per forward call, with g <= G candidates found for x and k the step's draft length:

    lookahead  sum_i (i + N - 1) = W(N-1) + W(W-1)/2
    verify     max(1, g) + g * min(k, N-1)       ([x] + candidate, one fork each)

W = 5, N = 3, G = 5 (all 5 candidates found, k >= 2): 20 + 15 = 35 tokens per call; the
defaults W = 1, N = 5, G = 2: 4 + 10 = 14 (see LookaheadProposer for why). G = 0 is refused:
the verification branch is the only place tokens are accepted, so without it the window
would cost every call its tokens and never save one.

The n-gram pool: key = first token, value = at most G distinct (N-1)-token tails, least
recently used dropped first (LookaheadDecoding's update_token_map; llama.cpp keeps a FIFO
ring). It is fed the window's W n-grams after every step and every n-gram of the prompt
and the accepted text (the reference code's POOL_FROM_PROMPT): on repetitive text those
are the n-grams most often accepted.

The window update after each step, whatever the verifier accepted: every level moves up
one and the new tokens become the last level; cell (0, 0) is overwritten by the next
pending token. After one emitted token, level j+1's guess for p' + i + j (p' = p + 1) lands
exactly at level j. After several, the window is still one Jacobi iteration further, its
guesses a few positions off; the reference code does the same (llama.cpp shifts once more
per extra token, refilling the last level with old guesses).

The window starts as tokens drawn from the prompt by a generator seeded with the token ids
(llama.cpp's and the reference code's prompt initialisation, made deterministic): the same
input gives the same proposals, output and statistics.

Exact: the verifier accepts only what the target itself emits (greedy: its argmax; sampled:
the speculative-sampling rule), so the guesses decide speed, never the output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from numbers import Integral

import numpy as np

from refinfer.decoding.speculative import DecodeState, Proposal, Proposer
from refinfer.errors import InvalidParameterError
from refinfer.kv_pool import blocks_for

# Largest W, N, G accepted: a call runs W(W+1)/2 + W(N-2) + G*N tokens, so beyond these a
# step costs hundreds of tokens for guesses that are almost never all right.
MAX_W, MAX_N, MAX_G = 64, 16, 64


def check_parameters(W: int, N: int, G: int) -> None:
    """InvalidParameterError with one line naming the first of W, N, G out of range."""
    for name, value, low, high in (
        ("window W", W, 1, MAX_W),
        ("n-gram size N", N, 2, MAX_N),
        ("guesses G", G, 1, MAX_G),
    ):
        is_integer = isinstance(value, Integral) and not isinstance(value, bool)
        if not (is_integer and low <= value <= high):
            raise InvalidParameterError(
                f"lookahead {name} must be an integer in [{low}, {high}], got {value!r}"
            )


class NgramPool:
    """n-grams of N tokens keyed by their first token: at most G tails per key, LRU."""

    def __init__(self, N: int, G: int) -> None:
        """An empty pool for n-grams of N tokens, G per first token."""
        self.N, self.G = N, G
        self._tails: dict[int, OrderedDict[tuple[int, ...], None]] = {}  # key -> oldest first

    def add(self, ngram: Sequence[int]) -> None:
        """Remember an n-gram as the most recent of its key; drop the oldest beyond G. O(N)."""
        assert len(ngram) == self.N, f"an n-gram of {len(ngram)} tokens, not N = {self.N}"
        tails = self._tails.setdefault(int(ngram[0]), OrderedDict())
        tail = tuple(int(t) for t in ngram[1:])
        tails[tail] = None
        tails.move_to_end(tail)
        if len(tails) > self.G:
            tails.popitem(last=False)

    def add_text(self, tokens: Sequence[int], start: int = 0) -> None:
        """Add every n-gram of `tokens` that ends at index `start` or later, in order."""
        for end in range(max(start, self.N - 1), len(tokens)):
            self.add(tokens[end - self.N + 1 : end + 1])

    def tails(self, first: int) -> list[tuple[int, ...]]:
        """The (N-1)-token continuations of `first`, most recently used first."""
        return list(reversed(self._tails.get(first, {})))


class Window:
    """The lookahead branch's N-1 levels x W columns: levels[j, i] guesses position p + i + j."""

    def __init__(self, levels: np.ndarray) -> None:
        """Hold the levels (N-1, W); levels[0, 0] is set to the pending token before each use."""
        self.levels = levels  # int64[N-1, W]

    @classmethod
    def from_tokens(cls, tokens: Sequence[int], W: int, N: int) -> Window:
        """Levels drawn from `tokens` by a generator seeded with them: deterministic."""
        rng = np.random.default_rng(list(tokens))
        return cls(rng.choice(np.asarray(tokens, np.int64), size=(N - 1, W)))

    def columns(self, pending: int) -> list[list[int]]:
        """Column i's tokens in position order: levels[0, :i+1], then levels[1:, i]."""
        self.levels[0, 0] = pending
        W = self.levels.shape[1]
        return [self.levels[0, : i + 1].tolist() + self.levels[1:, i].tolist() for i in range(W)]

    def ngrams(self, new: Sequence[int]) -> list[list[int]]:
        """Column i read top to bottom, then new[i]: one n-gram per column."""
        return [self.levels[:, i].tolist() + [int(new[i])] for i in range(len(new))]

    def advance(self, new: Sequence[int]) -> None:
        """One Jacobi iteration on: each level moves up one, `new` becomes the last level."""
        self.levels = np.vstack([self.levels[1:], np.asarray(new, np.int64)[None, :]])


def blocks_spanned(n_tokens: int, block_size: int) -> int:
    """The most blocks n_tokens >= 1 consecutive slots can touch, starting anywhere in a block."""
    return blocks_for(n_tokens - 1, block_size) + 1


class LookaheadProposer(Proposer):
    """Lookahead decoding with window W, n-gram size N and at most G candidates per step.

    The defaults suit a CPU, where a call of T tokens costs about 1 + 0.2 (T - 1) calls of
    one token (speculative.VERIFY_COST), not the GPU of the paper, where T tokens cost about
    as much as one. A step saves at most N - 1 calls but pays for W(N-1) + W(W-1)/2 window
    tokens every time, so: W = 1 (the quadratic level-0 term vanishes), N = 5 (long n-grams
    for text that repeats itself), G = 2: up to 14 tokens per call. The paper's W = 5, N = 3,
    G = 5 runs up to 35 and was slower on each of bench/bench_decoding.py's three prompts
    (SmolLM2-135M, 128 greedy tokens).
    """

    name = "lookahead"

    def __init__(self, W: int = 1, N: int = 5, G: int = 2) -> None:
        """Check W, N, G (InvalidParameterError); the window starts at the first propose."""
        check_parameters(W, N, G)
        self.W, self.N, self.G = W, N, G
        self.ngrams = NgramPool(N, G)
        self.window: Window | None = None
        self._columns: list[int] = []  # pool sequences of this step's window columns
        self._seen = 0  # tokens of the history already fed to the n-gram pool

    def propose(self, state: DecodeState, k: int) -> Proposal:
        """The pool's n-grams for the pending token (trimmed to k), and the window's columns."""
        if self.window is None:
            self.window = Window.from_tokens(state.history, self.W, self.N)
        self.ngrams.add_text(state.history, self._seen)
        self._seen = len(state.history)
        tails = [list(tail[:k]) for tail in self.ngrams.tails(state.pending)]
        branches = [b for i, b in enumerate(tails) if b not in tails[:i]]  # trimming may repeat
        return Proposal(branches, side_chunks=self._fork_columns(state))

    def _fork_columns(self, state: DecodeState) -> list[tuple[int, list[int]]]:
        """One fork of state.seq per window column, with the column's chunk; none if the
        deepest guess would lie past the model's context."""
        last_position = len(state.history) - 1 + (self.W - 1) + (self.N - 2)
        if last_position >= state.model.config.context_length:
            return []
        chunks = self.window.columns(state.pending)
        self._columns = [state.pool.fork(state.seq) for _ in chunks]
        return list(zip(self._columns, chunks, strict=True))

    def observe(
        self, state: DecodeState, accepted: list[int], side_logits: list[np.ndarray]
    ) -> None:
        """Take the window's new level from each column's last row; collect its n-grams."""
        if not self._columns:  # the window did not run this step
            return
        new = [int(np.argmax(rows[-1])) for rows in side_logits]  # (W,)
        for ngram in self.window.ngrams(new):
            self.ngrams.add(ngram)
        self.window.advance(new)
        self._free_columns(state)

    def extra_blocks(self, block_size: int) -> int:
        """Blocks one step can take beyond the accepted sequence, whatever its length.

        Each column's chunk (i + N - 1 tokens) and each of the G forked candidates ([x] +
        N - 1 tokens) touches at most blocks_spanned blocks (a copy of the shared partial
        block among them), and the forks sharing that block make the accepted sequence copy
        it too when a single branch is appended to it: one more.
        """
        columns = sum(blocks_spanned(i + self.N - 1, block_size) for i in range(self.W))
        return columns + self.G * blocks_spanned(self.N, block_size) + 1

    def close(self, state: DecodeState) -> None:
        """Free the column forks, if a step was cut short, and start afresh next time."""
        self._free_columns(state)
        self.ngrams = NgramPool(self.N, self.G)
        self.window, self._seen = None, 0

    def _free_columns(self, state: DecodeState) -> None:
        """Free this step's column forks (a no-op when the window did not run)."""
        for seq in self._columns:
            state.pool.free(seq)
        self._columns = []
