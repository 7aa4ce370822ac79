"""Lookahead decoding: the n-gram pool, the Jacobi window, the columns as forked sequences,
and greedy exactness with no leaked blocks on tiny synthetic models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinfer.decoding.generate import generate
from refinfer.decoding.lookahead import LookaheadProposer, NgramPool, Window, blocks_spanned
from refinfer.decoding.speculative import DecodeState, step
from refinfer.errors import InvalidParameterError
from refinfer.gguf import read_gguf
from refinfer.kv_pool import KVPool, blocks_for
from refinfer.model import Batch, Model
from refinfer.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_f32: Path) -> Model:
    """The tiny random Llama (vocab 128, context 256), without a vocabulary: ids only."""
    return Model(read_gguf(tiny_f32), tokenizer=None)


# ---- parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("W", "N", "G", "name"),
    [(0, 3, 5, "window W"), (5, 1, 5, "n-gram size N"), (5, 17, 5, "n-gram size N"),
     (5, 3, 0, "guesses G"), (2.5, 3, 5, "window W"), (True, 3, 5, "window W"),
     (65, 3, 5, "window W"), (5, 3, -1, "guesses G")],
)  # fmt: skip
def test_parameters_out_of_range_are_one_line_errors(W, N, G, name):
    with pytest.raises(InvalidParameterError, match=name) as e:
        LookaheadProposer(W, N, G)
    assert "\n" not in str(e.value)


def test_parameters_at_the_limits_are_accepted():
    for W, N, G in [(1, 2, 1), (64, 16, 64)]:
        proposer = LookaheadProposer(W, N, G)
        assert (proposer.W, proposer.N, proposer.G) == (W, N, G)
        assert proposer.extra_blocks(16) >= W + G  # a block at least per column and candidate


# ---- the n-gram pool -------------------------------------------------------------------


def test_ngram_pool_keeps_g_tails_per_key_least_recently_used_out():
    pool = NgramPool(N=3, G=2)
    pool.add([7, 1, 2])
    pool.add([7, 3, 4])
    pool.add([8, 1, 2])
    assert pool.tails(7) == [(3, 4), (1, 2)]  # most recent first
    pool.add([7, 1, 2])  # seen again: most recent, not a duplicate
    assert pool.tails(7) == [(1, 2), (3, 4)]
    pool.add([7, 5, 6])  # a third tail: the least recently used one goes
    assert pool.tails(7) == [(5, 6), (1, 2)]
    assert pool.tails(8) == [(1, 2)]
    assert pool.tails(9) == []


def test_ngram_pool_add_text_takes_the_ngrams_ending_from_start():
    pool = NgramPool(N=3, G=10)
    pool.add_text([1, 2, 3, 1, 2, 4], start=4)  # n-grams ending at indices 4 and 5
    assert pool.tails(3) == [(1, 2)]
    assert pool.tails(1) == [(2, 4)]
    assert pool.tails(2) == []
    pool.add_text([1, 2, 3, 1, 2, 4])  # all of them
    assert pool.tails(1) == [(2, 4), (2, 3)]
    assert pool.tails(2) == [(3, 1)]


# ---- the window ------------------------------------------------------------------------


def drawn_window() -> Window:
    """The module docstring's W = 4, N = 4 window, with a..k as 1..11 (x is set by columns)."""
    return Window(np.array([[-1, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], np.int64))


def test_window_columns_are_the_drawn_sequences():
    x, (a, b, c, d, e, f, g, h, i, j, k) = 0, range(1, 12)
    assert drawn_window().columns(x) == [
        [x, d, h],
        [x, a, e, i],
        [x, a, b, f, j],
        [x, a, b, c, g, k],
    ]


def test_window_ngrams_read_each_column_down_then_its_new_token():
    window = drawn_window()
    window.columns(0)
    assert window.ngrams([20, 21, 22, 23]) == [
        [0, 4, 8, 20],
        [1, 5, 9, 21],
        [2, 6, 10, 22],
        [3, 7, 11, 23],
    ]


def test_window_advance_moves_levels_up_and_appends_the_new_level():
    window = drawn_window()
    window.advance([20, 21, 22, 23])
    assert window.levels.tolist() == [[4, 5, 6, 7], [8, 9, 10, 11], [20, 21, 22, 23]]


def test_window_from_tokens_is_deterministic_and_drawn_from_them():
    tokens = [5, 17, 5, 99, 42]
    w1, w2 = Window.from_tokens(tokens, W=6, N=4), Window.from_tokens(tokens, W=6, N=4)
    assert w1.levels.shape == (3, 6)
    assert np.array_equal(w1.levels, w2.levels)
    assert set(w1.levels.ravel()) <= set(tokens)
    assert not np.array_equal(w1.levels, Window.from_tokens(tokens[::-1], W=6, N=4).levels)


def test_blocks_spanned_is_the_worst_case_over_start_offsets():
    for block_size in (1, 2, 3, 16):
        for n in range(1, 40):
            worst = max(
                blocks_for(start + n, block_size) - start // block_size
                for start in range(block_size)
            )
            assert blocks_spanned(n, block_size) == worst


# ---- the columns as forked sequences ---------------------------------------------------


def prefilled(model: Model, prompt: list[int], n_blocks: int, block_size: int) -> DecodeState:
    """A greedy DecodeState after the prefill of prompt[:-1], prompt[-1] pending."""
    pool = KVPool(model.config, n_blocks, block_size)
    state = DecodeState(model, pool, pool.new_sequence(), list(prompt), Sampler(SamplingParams()))
    if len(prompt) > 1:
        model.forward(Batch.append(pool, [(state.seq, prompt[:-1])]), pool)
    return state


def test_each_column_computes_what_a_fresh_prefill_of_its_tokens_computes(tiny):
    """The side chunks realise the paper's attention pattern: column i's last row equals the
    logits after history + its tokens, computed alone (positions, forks, pending all right)."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]  # 19 in the pool
    proposer = LookaheadProposer(W=4, N=3, G=2)
    state = prefilled(tiny, prompt, n_blocks=8, block_size=16)  # as Model.logits: same sums
    proposal = proposer.propose(state, k=2)
    assert len(proposal.side_chunks) == 4
    chunks = [(state.seq, [state.pending])] + proposal.side_chunks
    rows = tiny.forward(Batch.append(state.pool, chunks), state.pool)
    ends = np.cumsum([len(tokens) for _, tokens in chunks])
    for (_, tokens), end in zip(proposal.side_chunks, ends[1:], strict=True):
        assert tokens[0] == state.pending
        alone = tiny.logits(state.history[:-1] + tokens)[-1]
        np.testing.assert_array_equal(rows[end - 1], alone)


def test_a_step_makes_the_new_level_and_pools_the_column_ngrams(tiny):
    """observe reads each column's last row: its argmax is the new level and ends the column's
    n-gram; the column forks are freed."""
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    levels = np.array([[-1, 11, 12], [20, 21, 22]], np.int64)  # W = 3, N = 3
    proposer = LookaheadProposer(W=3, N=3, G=8)
    proposer.window = Window(levels.copy())
    state = prefilled(tiny, prompt, n_blocks=8, block_size=16)
    step(state, proposer, k=2)
    columns = Window(levels.copy()).columns(prompt[-1])
    new = [int(np.argmax(tiny.logits(prompt[:-1] + column)[-1])) for column in columns]
    assert proposer.window.levels.tolist() == [[20, 21, 22], new]
    for i, first in enumerate([prompt[-1], 11, 12]):
        assert (levels[1, i], new[i]) in proposer.ngrams.tails(first)
    in_use = blocks_for(state.pool.length(state.seq), 16)
    assert state.pool.n_free_blocks == state.pool.n_blocks - in_use


def test_no_window_when_its_deepest_guess_would_pass_the_context(tiny):
    W, N, context = 4, 3, tiny.config.context_length
    fits = context - (W - 1) - (N - 2)  # history length whose deepest guess is the last position
    for length, n_columns in ((fits, W), (fits + 1, 0)):
        proposer = LookaheadProposer(W, N, G=1)
        state = prefilled(tiny, [t % 100 for t in range(length)], n_blocks=32, block_size=16)
        assert len(proposer.propose(state, k=2).side_chunks) == n_columns
        proposer.close(state)


# ---- exactness and the pool ------------------------------------------------------------


def greedy_lookahead(model: Model, prompt: list[int], max_new: int, proposer: LookaheadProposer,
                     block_size: int) -> tuple[list[int], int]:  # fmt: skip
    """Greedy lookahead steps in a pool sized exactly as the decode loop sizes it; returns the
    new tokens and the tokens accepted from proposals. Asserts every block is back at the end."""
    n_blocks = blocks_for(len(prompt) + max_new, block_size) + proposer.extra_blocks(block_size)
    state = prefilled(model, prompt, n_blocks, block_size)  # the first step emits token 1
    accepted = 0
    while (remaining := len(prompt) + max_new - len(state.history)) > 0:
        verdict, _, _ = step(state, proposer, min(proposer.N - 1, remaining - 1))
        accepted += verdict.n_accepted
    proposer.close(state)
    state.pool.free(state.seq)
    state.pool.check()
    assert state.pool.n_free_blocks == n_blocks, "blocks leaked"
    return state.history[len(prompt) :][:max_new], accepted


@settings(max_examples=40)
@given(
    pattern=st.lists(st.integers(0, 127), min_size=1, max_size=6),
    repeats=st.integers(1, 5),
    max_new=st.integers(1, 24),
    W=st.integers(1, 4),
    N=st.integers(2, 5),
    G=st.integers(1, 4),
    block_size=st.sampled_from([1, 3, 16]),
)
def test_greedy_lookahead_emits_plain_greedy_tokens_and_frees_every_block(
    tiny, pattern, repeats, max_new, W, N, G, block_size
):
    prompt = pattern * repeats  # repeated text: its n-grams get proposed, some accepted
    plain = generate(tiny, prompt, max_new_tokens=max_new).ids
    ids, _ = greedy_lookahead(tiny, prompt, max_new, LookaheadProposer(W, N, G), block_size)
    assert ids == plain


def test_lookahead_accepts_proposals_on_a_looping_continuation(tiny):
    """Not only exact but useful: the tiny model repeats itself, and n-grams get accepted."""
    prompt = [7, 7, 2, 7, 7, 2, 7]
    ids, accepted = greedy_lookahead(tiny, prompt, 30, LookaheadProposer(4, 4, 3), 16)
    assert ids == generate(tiny, prompt, max_new_tokens=30).ids
    assert accepted >= 5  # 11 when written


def test_generate_with_lookahead_is_plain_greedy_and_deterministic(tiny):
    prompt = [7, 7, 2, 7, 7, 2, 7]
    options = dict(decoding="lookahead", window=3, ngram=3, guesses=2)
    first = generate(tiny, prompt, max_new_tokens=20, **options)
    again = generate(tiny, prompt, max_new_tokens=20, **options)
    assert first.ids == generate(tiny, prompt, max_new_tokens=20).ids
    assert (first.ids, first.stats.steps) == (again.ids, again.stats.steps)
