"""kernels.attention.paged_attention against its NumPy twin, reference.attention (float64).

What is held (invariants 1 and 4 of DESIGN.md):
- tiled online-softmax attention over a paged, scattered KV pool equals the naive
  float64 attention (full score matrix, reference.attention_mask) on the same K/V,
  within the float32 rounding bound of `_bound`; over random lengths across block
  boundaries, block sizes 1/4/16, GQA ratios 1-4, windows 0 / smaller / larger than
  the sequence, several sequences in one shuffled flat batch, queries at arbitrary
  positions (prefill chunks that do not start at 0);
- the window convention exactly: a query at p sees keys max(0, p - window + 1) .. p,
  no more and no fewer (one-hot values expose the set of keys that were read);
- a token's output is bitwise the same alone (T = 1) or in any batch, whatever the
  physical placement of its blocks, whatever the thread count, and in decode (the
  pool holding only keys 0..p) as in prefill (later keys already in the pool).
Unused pool slots hold NaN: a kernel that reads one fails every comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinfer import reference
from refinfer.kernels.attention import (
    SPLIT_BELOW,
    attention_working_memory,
    chunk_keys,
    paged_attention,
)

U32 = 2.0**-24  # unit roundoff of float32


# ---- a paged pool with scattered blocks --------------------------------------------


@dataclass
class Case:
    """Sequences in a paged pool and a flat batch of query tokens over them."""

    k: list[np.ndarray]  # per sequence: float32[n, KVH, HD], keys at positions 0..n-1
    v: list[np.ndarray]  # per sequence: float32[n, KVH, HD]
    q_full: list[np.ndarray]  # per sequence: float32[n, H, HD], a query at every position
    k_cache: np.ndarray  # float32[n_blocks, KVH, HD, BS]; unused slots are NaN
    v_cache: np.ndarray  # float32[n_blocks, KVH, BS, HD]
    block_tables: np.ndarray  # int32[S, max_blocks], padded with -1
    seq_index: np.ndarray  # int32[T]
    positions: np.ndarray  # int32[T]
    window: int

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[3]

    @property
    def q(self) -> np.ndarray:
        """float32[T, H, HD]: the batch's queries."""
        return np.stack(
            [self.q_full[s][p] for s, p in zip(self.seq_index, self.positions, strict=True)]
        )


def scatter(
    k: list[np.ndarray], v: list[np.ndarray], block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write each sequence's K/V into randomly chosen physical blocks of a NaN-filled pool.

    Returns k_cache float32[n_blocks, KVH, HD, BS], v_cache float32[n_blocks, KVH, BS, HD]
    (the layout of kv_pool.py) and block_tables int32[S, max_blocks]. The pool has spare
    blocks, so physical ids are neither contiguous nor dense.
    """
    _, kvh, hd = k[0].shape
    needed = [-(-len(ks) // block_size) for ks in k]  # blocks per sequence
    n_blocks = sum(needed) + 3
    physical = rng.permutation(n_blocks)  # block ids in a random order
    k_cache = np.full((n_blocks, kvh, hd, block_size), np.nan, dtype=np.float32)
    v_cache = np.full((n_blocks, kvh, block_size, hd), np.nan, dtype=np.float32)
    tables = np.full((len(k), max(needed) + 2), -1, dtype=np.int32)
    start = 0
    for s, (ks, vs) in enumerate(zip(k, v, strict=True)):
        tables[s, : needed[s]] = physical[start : start + needed[s]]
        start += needed[s]
        for j in range(len(ks)):
            k_cache[tables[s, j // block_size], :, :, j % block_size] = ks[j]
            v_cache[tables[s, j // block_size], :, j % block_size] = vs[j]
    return k_cache, v_cache, tables


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Random sequences, pool layout and query batch (see the module docstring)."""
    block_size = draw(st.sampled_from([1, 4, 16]))
    kvh = draw(st.integers(1, 2))
    group = draw(st.integers(1, 4))  # GQA ratio H / KVH
    hd = draw(st.sampled_from([4, 16, 20, 64]))  # 4 and 20 leave HD % 16 dimensions
    lengths = draw(
        st.lists(
            st.one_of(
                st.integers(1, 5 * block_size + 3),
                st.sampled_from([1, block_size, 2 * block_size, 3 * block_size]),
            ).map(lambda n: min(n, 80)),
            min_size=1,
            max_size=3,
        )
    )
    longest = max(lengths)
    window = draw(st.one_of(st.just(0), st.integers(1, longest + 4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    k = [normal(n, kvh, hd) for n in lengths]
    v = [normal(n, kvh, hd) for n in lengths]
    q_full = [normal(n, kvh * group, hd) * np.float32(2) for n in lengths]  # peaked softmax too
    k_cache, v_cache, tables = scatter(k, v, block_size, rng)
    tokens = []  # (sequence, position): a chunk ending at n - 1, starting anywhere
    for s, n in enumerate(lengths):
        first = draw(st.integers(0, n - 1))
        tokens += [(s, p) for p in range(first, n)]
    rng.shuffle(tokens)  # sequences interleaved in the flat batch
    seq_index = np.array([s for s, _ in tokens], dtype=np.int32)
    positions = np.array([p for _, p in tokens], dtype=np.int32)
    return Case(k, v, q_full, k_cache, v_cache, tables, seq_index, positions, window)


def run(
    case: Case, q: np.ndarray | None = None, split_below: int = SPLIT_BELOW, **replace: np.ndarray
) -> np.ndarray:
    """paged_attention on the case (fields overridable by keyword) -> float32[T, H, HD]."""
    q = case.q if q is None else q
    args = dict(
        k_cache=case.k_cache, v_cache=case.v_cache, block_tables=case.block_tables,
        seq_index=case.seq_index, positions=case.positions,
    )  # fmt: skip
    args |= replace
    out = np.full(q.shape, np.nan, dtype=np.float32)
    paged_attention(
        q, args["k_cache"], args["v_cache"], args["block_tables"], args["seq_index"],
        args["positions"], case.window, 1 / np.sqrt(q.shape[-1]), out, split_below,
    )  # fmt: skip
    return out


# ---- the NumPy twin and the error bound --------------------------------------------


def naive(case: Case, window: int | None = None) -> np.ndarray:
    """float64[T, H, HD]: reference.attention over each whole sequence, rows of the batch."""
    window = case.window if window is None else window
    full = []
    for q, k, v in zip(case.q_full, case.k, case.v, strict=True):
        mask = reference.attention_mask(np.arange(len(k)), window)
        f64 = [a.astype(np.float64) for a in (q, k, v)]
        full.append(reference.attention(*f64, mask))  # (n, H, HD)
    return np.stack([full[s][p] for s, p in zip(case.seq_index, case.positions, strict=True)])


def gamma(m: int | np.ndarray) -> np.ndarray:
    """Higham's gamma_m = m u / (1 - m u): the relative error of m float32 roundings."""
    return m * U32 / (1 - m * U32)


def _bound(case: Case) -> np.ndarray:
    """|out - exact| bound per (t, h), broadcast over HD: float32 online softmax vs float64.

    A first-order rounding analysis of the kernel's arithmetic (not a fudge factor):
    - score s_j = fl(q . k_j) * scale: HD products added in sequence (HD roundings), the
      scale (2 roundings: fl(1 / fl(sqrt HD))) and its product, so
      |ds_j| <= delta = gamma(HD + 3) * scale * max_j sum_d |q_d k_jd|;
    - perturbing the scores by at most delta moves each softmax weight by a factor
      within exp(+-2 delta), hence out by at most (exp(2 delta) - 1) * max_j |v_j|;
    - the online sums: each term exp(s_j - m) v_j meets at most n adds, one rescale per
      tile, the exp (< 1 ulp) and its argument's rounding (which costs at most
      u * x e^-x <= u absolutely), so acc and l are each within gamma(2n + 2 tiles + 8)
      of sum_j |p_j v_j| and of l; out = acc / l adds one rounding: 3 gamma in all.
    The float64 reference contributes n 2^-52 of its own. On random data the observed
    errors are 10-100x below this; a wrong key, scale or window shifts out by ~1 / n.
    """
    hd = case.q_full[0].shape[-1]
    bs = case.block_size
    q = case.q.astype(np.float64)
    bounds = np.empty(q.shape[:2])  # (T, H)
    for t, (s, p) in enumerate(zip(case.seq_index, case.positions, strict=True)):
        lo = max(0, p - case.window + 1) if case.window else 0
        k = case.k[s][lo : p + 1].astype(np.float64)  # (n, KVH, HD): the visible keys
        v = case.v[s][lo : p + 1].astype(np.float64)
        group = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (n, H, HD)
        qk = np.einsum("hd,jhd->hj", np.abs(q[t]), np.abs(k)).max(axis=1) / np.sqrt(hd)  # (H,)
        delta = gamma(hd + 3) * qk
        n, tiles = len(k), p // bs - lo // bs + 1
        vmax = np.abs(v).max(axis=(0, 2))  # (H,)
        bounds[t] = vmax * (np.expm1(2 * delta) + 3 * gamma(2 * n + 2 * tiles + 8) + n * 2.0**-52)
    return bounds[:, :, None]


def assert_close(out: np.ndarray, exact: np.ndarray, bound: np.ndarray) -> None:
    err = np.abs(out.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def assert_bitwise(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), "outputs differ in some bit"


# ---- kernel == reference -----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(cases())
def test_paged_attention_matches_reference(case: Case) -> None:
    out = run(case)
    assert_close(out, naive(case), _bound(case))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_bound_catches_an_off_by_one_window(case: Case) -> None:
    """The tolerance is tight enough: a window one larger or smaller would fail the check.

    With q = 0 every visible key weighs 1 / n, so one key more or less moves out by
    |v_j - out| / n, which must exceed the bound somewhere in out[t].
    """
    case.q_full = [np.zeros_like(q) for q in case.q_full]
    out = run(case)
    bound = _bound(case)
    for t, p in enumerate(case.positions):
        if case.window and 2 <= case.window <= p:  # both neighbours of the window change keys
            for wrong in (case.window - 1, case.window + 1):
                err = np.abs(out[t].astype(np.float64) - naive(case, wrong)[t])
                assert np.any(err > bound[t]), f"window {wrong} passes as {case.window}"


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [0, 1, 2, 3, 4, 5, 15, 16, 17, 33, 100])
def test_window_reads_exactly_the_visible_keys(block_size: int, window: int) -> None:
    """With v_j = one-hot(j), out[t, h, j] > 0 exactly for the keys j that were read."""
    n, hd, kvh, group = 40, 48, 2, 2
    rng = np.random.default_rng(block_size * 1000 + window)
    k = [rng.standard_normal((n, kvh, hd), dtype=np.float32)]
    v = [np.zeros((n, kvh, hd), dtype=np.float32)]
    v[0][np.arange(n), :, np.arange(n)] = 1  # v[j, g] = e_j
    q_full = [rng.standard_normal((n, kvh * group, hd), dtype=np.float32)]
    k_cache, v_cache, tables = scatter(k, v, block_size, rng)
    positions = rng.permutation(n).astype(np.int32)
    case = Case(
        k, v, q_full, k_cache, v_cache, tables, np.zeros(n, np.int32), positions, window
    )  # fmt: skip
    out = run(case)
    for t, p in enumerate(positions):
        lo = max(0, p - window + 1) if window else 0
        expected = np.zeros(hd, dtype=bool)
        expected[lo : p + 1] = True
        for h in range(kvh * group):
            read = out[t, h] > 0
            assert np.array_equal(read, expected), (
                f"position {p}, window {window}: read keys {np.flatnonzero(read).tolist()}, "
                f"expected {lo}..{p}"
            )
    # and the reference's mask states the same convention
    mask = reference.attention_mask(np.arange(n), window)
    assert mask.sum(axis=1).tolist() == [min(p + 1, window or n) for p in range(n)]


# ---- determinism, bitwise ----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(cases(), st.integers(0, 2**32 - 1))
def test_alone_equals_batched_and_placement_does_not_matter(case: Case, seed: int) -> None:
    """out[t] alone (T = 1) == out[t] in the batch == out[t] with the blocks placed elsewhere."""
    batched = run(case)
    q = case.q
    for t in range(len(q)):
        alone = run(case, q[t : t + 1], seq_index=case.seq_index[t : t + 1],
                    positions=case.positions[t : t + 1])  # fmt: skip
        assert_bitwise(alone[0], batched[t])
    moved = scatter(case.k, case.v, case.block_size, np.random.default_rng(seed))
    elsewhere = run(case, k_cache=moved[0], v_cache=moved[1], block_tables=moved[2])
    assert_bitwise(elsewhere, batched)


@settings(max_examples=20, deadline=None)
@given(cases())
def test_decode_equals_prefill(case: Case) -> None:
    """Token by token with only keys 0..p in the pool == the whole chunk with later keys present."""
    prefill = run(case)
    bs = case.block_size
    for t, (s, p) in enumerate(zip(case.seq_index, case.positions, strict=True)):
        k_cache, v_cache = case.k_cache.copy(), case.v_cache.copy()
        table = case.block_tables[s]
        for j in range(p + 1, len(case.k[s])):  # keys not written yet in decode
            k_cache[table[j // bs], :, :, j % bs] = np.nan
            v_cache[table[j // bs], :, j % bs] = np.nan
        one = slice(t, t + 1)
        decode = run(case, case.q[one], k_cache=k_cache, v_cache=v_cache,
                     seq_index=case.seq_index[one], positions=case.positions[one])  # fmt: skip
        assert_bitwise(decode[0], prefill[t])


def test_thread_count_does_not_change_bits() -> None:
    """1 thread and all threads give identical bits (prefill and decode shapes)."""
    rng = np.random.default_rng(7)
    kvh, group, hd, bs = 3, 3, 64, 16
    lengths = [300, 77, 16]
    k = [rng.standard_normal((n, kvh, hd), dtype=np.float32) for n in lengths]
    v = [rng.standard_normal((n, kvh, hd), dtype=np.float32) for n in lengths]
    q_full = [rng.standard_normal((n, kvh * group, hd), dtype=np.float32) for n in lengths]
    k_cache, v_cache, tables = scatter(k, v, bs, rng)
    tokens = [(0, p) for p in range(100, 300)] + [(1, 76), (2, 15), (2, 3)]
    seq_index = np.array([s for s, _ in tokens], dtype=np.int32)
    positions = np.array([p for _, p in tokens], dtype=np.int32)
    before = numba.get_num_threads()
    for window in (0, 50):
        case = Case(k, v, q_full, k_cache, v_cache, tables, seq_index, positions, window)
        try:
            numba.set_num_threads(1)
            one = run(case)
        finally:
            numba.set_num_threads(before)
        assert_bitwise(run(case), one)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_both_work_splits_give_the_same_bits(case: Case) -> None:
    """Chunks as separate items, folded afterwards (decode) == folded as made (prefill)."""
    assert_bitwise(run(case, split_below=len(case.positions) + 1), run(case, split_below=0))


@pytest.mark.parametrize("bs", [1, 16, 48])
def test_long_contexts_fold_many_chunks_in_either_split(bs: int) -> None:
    """Many chunks per query (windows cutting chunks anywhere): both splits, 1 or all threads."""
    rng = np.random.default_rng(bs)
    kvh, group, hd = 3, 3, 64
    lengths = [700, 129, 64]
    k = [rng.standard_normal((n, kvh, hd), dtype=np.float32) for n in lengths]
    v = [rng.standard_normal((n, kvh, hd), dtype=np.float32) for n in lengths]
    q_full = [rng.standard_normal((n, kvh * group, hd), dtype=np.float32) * 2 for n in lengths]
    k_cache, v_cache, tables = scatter(k, v, bs, rng)
    tokens = [(0, 699), (0, 640), (0, 5), (1, 128), (1, 127), (2, 63)]
    seq_index = np.array([s for s, _ in tokens], dtype=np.int32)
    positions = np.array([p for _, p in tokens], dtype=np.int32)
    before = numba.get_num_threads()
    for window in (0, 1, 65, 300):
        case = Case(k, v, q_full, k_cache, v_cache, tables, seq_index, positions, window)
        whole = run(case, split_below=0)
        assert_close(whole, naive(case), _bound(case))
        try:
            numba.set_num_threads(1)
            one = run(case, split_below=len(tokens) + 1)
        finally:
            numba.set_num_threads(before)
        assert_bitwise(run(case, split_below=len(tokens) + 1), whole)
        assert_bitwise(one, whole)
    assert 700 // chunk_keys(bs) >= 7  # the longest query folds many chunks


@settings(max_examples=20, deadline=None)
@given(cases(), st.integers(0, 2**32 - 1))
def test_block_sizes_dividing_the_chunk_give_the_same_bits(case: Case, seed: int) -> None:
    """The reduction goes by chunks of C = 64 keys, not by pool blocks: BS = 1, 4, 16 agree."""
    out = run(case)
    for bs in (1, 4, 16):
        k_cache, v_cache, tables = scatter(case.k, case.v, bs, np.random.default_rng(seed))
        assert chunk_keys(bs) == chunk_keys(case.block_size)
        assert_bitwise(run(case, k_cache=k_cache, v_cache=v_cache, block_tables=tables), out)


# ---- working memory ----------------------------------------------------------------


def test_working_memory_estimate() -> None:
    wm = attention_working_memory(n_queries=512, n_keys=512, n_heads=9, head_dim=64, block_size=16)
    assert wm["tiled_per_item"] == 4 * (2 + 64 + 64)  # m, l, acc[HD], scores[C], C = 64 keys
    assert wm["tiled"] == 512 * 9 * wm["tiled_per_item"]
    assert wm["naive"] == 4 * 9 * 512 * 512  # scores[H, T, n_keys]
    assert wm["ratio"] == wm["naive"] / wm["tiled"]
