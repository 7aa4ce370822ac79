"""kernels.attention_ggml.paged_attention_ggml against its NumPy twin, ggml.attention.attention.

What is held:
- the kernel equals the twin bitwise for both x86 builds, 8 lanes (AVX2) and 16
  (AVX-512), and with no `lanes` the host's (the twin reads llama.cpp's graph: f16 q and
  p, tinyBLAS's dot products, ggml's softmax) over random pools: block sizes 1/4/16, GQA
  ratios 1-4, HD with and without HD % 16, windows, several sequences in one shuffled
  batch, queries at arbitrary positions; the two builds give different bits;
- the twin's dot is tinyBLAS's order: lane l of `lanes` accumulates with fma, then hsum;
- the twin is attention: within float16 rounding of float64 reference.attention;
- the window convention: exactly the keys max(0, p - window + 1) .. p are read;
- a token's output is bitwise the same alone or in any batch, whatever the placement of
  its blocks, the block size, the thread count, and in decode as in prefill.
Unused pool slots hold NaN, so reading one fails every comparison.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import Case, assert_bitwise, cases, gamma, scatter

from refinfer import reference
from refinfer.ggml.attention import attention, dot
from refinfer.ggml.ops import LANES, fma, hsum, round_f16
from refinfer.kernels.attention_ggml import paged_attention_ggml

F32 = np.float32
SCALE = 0.125


def f16_case(case: Case) -> Case:
    """The case with K and V rounded to float16, in the lists and the pool (as model.py
    writes them); NaN slots stay NaN."""
    return replace(
        case,
        k=[round_f16(k) for k in case.k],
        v=[round_f16(v) for v in case.v],
        k_cache=round_f16(case.k_cache),
        v_cache=round_f16(case.v_cache),
    )


def run(
    case: Case, q: np.ndarray | None = None, lanes: int | None = None, **fields: np.ndarray
) -> np.ndarray:  # fmt: skip
    """paged_attention_ggml on the case (fields overridable by keyword) -> float32[T, H, HD].
    lanes: 8 or 16, None for the host's build."""
    q = case.q if q is None else q
    c = replace(case, **fields)
    out = np.full(q.shape, np.nan, dtype=F32)
    paged_attention_ggml(
        q, c.k_cache, c.v_cache, c.block_tables, c.seq_index, c.positions, c.window, SCALE, out,
        lanes,
    )  # fmt: skip
    return out


def twin(case: Case, lanes: int = LANES) -> np.ndarray:
    """float32[T, H, HD]: ggml.attention.attention over each whole sequence, rows of the batch."""
    full = []
    for q, k, v in zip(case.q_full, case.k, case.v, strict=True):
        mask = reference.attention_mask(np.arange(len(k)), case.window)
        full.append(attention(q, k, v, mask, F32(SCALE), lanes))  # (n, H, HD)
    return np.stack([full[s][p] for s, p in zip(case.seq_index, case.positions, strict=True)])


@pytest.mark.parametrize("lanes", [8, 16])
@settings(max_examples=40, deadline=None)
@given(cases())
def test_kernel_equals_twin(lanes: int, case: Case) -> None:
    case = f16_case(case)
    assert_bitwise(run(case, lanes=lanes), twin(case, lanes))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_twin_is_attention_within_float16_rounding(case: Case) -> None:
    """|twin - float64 attention| <= vmax (expm1(2 delta) + 2^-11 + gamma(2n + HD + 16)),
    delta = (2^-11 + gamma(HD + 3)) scale max_j sum_d |q_d k_jd|: q's float16 rounding and the
    float32 dot move each score by at most delta; p's float16 rounding moves out by at most
    2^-11 sum_j p_j |v_j|; expf (2 ulp), the sums and the scale the rest. K and V are
    float16 on both sides. A wrong key, scale or window moves out by about 1 / n."""
    case = f16_case(case)
    out = twin(case).astype(np.float64)
    hd = case.q_full[0].shape[-1]
    for t, (s, p) in enumerate(zip(case.seq_index, case.positions, strict=True)):
        lo = max(0, p - case.window + 1) if case.window else 0
        q = case.q_full[s][p].astype(np.float64)  # (H, HD)
        k = case.k[s][lo : p + 1].astype(np.float64)  # (n, KVH, HD)
        v = case.v[s][lo : p + 1].astype(np.float64)
        group = q.shape[0] // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (n, H, HD)
        exact = reference.attention(q[None], k, v, np.ones((1, len(k)), bool), SCALE)[0]
        qk = np.einsum("hd,jhd->hj", np.abs(q), np.abs(k)).max(axis=1) * SCALE  # (H,)
        delta = (2.0**-11 + gamma(hd + 3)) * qk
        vmax = np.abs(v).max(axis=(0, 2))  # (H,)
        bound = vmax * (np.expm1(2 * delta) + 2.0**-11 + gamma(2 * len(k) + hd + 16))
        assert np.all(np.abs(out[t] - exact) <= bound[:, None]), f"token {t}"


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [0, 1, 2, 7, 8, 9, 17, 100])
def test_window_reads_exactly_the_visible_keys(block_size: int, window: int) -> None:
    """q = 0 weighs every visible key equally; with v_j = one-hot(j), out[t, h, j] > 0
    exactly for the keys j that were read."""
    n, hd, kvh, group = 40, 48, 2, 2
    rng = np.random.default_rng(block_size * 1000 + window)
    k = [round_f16(rng.standard_normal((n, kvh, hd), dtype=F32))]
    v = [np.zeros((n, kvh, hd), dtype=F32)]
    v[0][np.arange(n), :, np.arange(n)] = 1  # v[j, g] = e_j
    q_full = [np.zeros((n, kvh * group, hd), dtype=F32)]
    k_cache, v_cache, tables = scatter(k, v, block_size, rng)
    positions = rng.permutation(n).astype(np.int32)
    case = Case(k, v, q_full, k_cache, v_cache, tables, np.zeros(n, np.int32), positions, window)
    out = run(case)
    for t, p in enumerate(positions):
        lo = max(0, p - window + 1) if window else 0
        expected = np.zeros(hd, dtype=bool)
        expected[lo : p + 1] = True
        assert np.array_equal(out[t] > 0, np.broadcast_to(expected, out[t].shape)), p


@settings(max_examples=30, deadline=None)
@given(cases(), st.integers(0, 2**32 - 1))
def test_alone_equals_batched_and_placement_does_not_matter(case: Case, seed: int) -> None:
    case = f16_case(case)
    batched = run(case)
    for t in range(len(case.positions)):
        one = slice(t, t + 1)
        alone = run(case, case.q[one], seq_index=case.seq_index[one], positions=case.positions[one])
        assert_bitwise(alone[0], batched[t])
    moved = scatter(case.k, case.v, case.block_size, np.random.default_rng(seed))
    assert_bitwise(run(case, k_cache=moved[0], v_cache=moved[1], block_tables=moved[2]), batched)
    for bs in (1, 4, 16):  # the lanes go by key position, not by pool block
        k_cache, v_cache, tables = scatter(case.k, case.v, bs, np.random.default_rng(seed))
        assert_bitwise(run(case, k_cache=k_cache, v_cache=v_cache, block_tables=tables), batched)


@settings(max_examples=15, deadline=None)
@given(cases())
def test_decode_equals_prefill(case: Case) -> None:
    """Token by token with only keys 0..p in the pool == the whole chunk with later keys present."""
    case = f16_case(case)
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


def long_rows_case(window: int) -> Case:
    """SmolLM2's shapes (H 9, KVH 3, HD 64), sequences of 150, 77 and 16 keys."""
    rng = np.random.default_rng(7)
    kvh, group, hd, bs = 3, 3, 64, 16
    lengths = [150, 77, 16]
    k = [round_f16(rng.standard_normal((n, kvh, hd), dtype=F32)) for n in lengths]
    v = [round_f16(rng.standard_normal((n, kvh, hd), dtype=F32)) for n in lengths]
    q_full = [rng.standard_normal((n, kvh * group, hd), dtype=F32) * 2 for n in lengths]
    k_cache, v_cache, tables = scatter(k, v, bs, rng)
    tokens = [(0, p) for p in range(100, 150)] + [(1, 76), (2, 15), (2, 3), (0, 0)]
    seq_index = np.array([s for s, _ in tokens], dtype=np.int32)
    positions = np.array([p for _, p in tokens], dtype=np.int32)
    return Case(k, v, q_full, k_cache, v_cache, tables, seq_index, positions, window)


@pytest.mark.parametrize("window", [0, 50])
def test_thread_count_does_not_change_bits_and_long_rows_match_the_twin(window: int) -> None:
    """1 thread == all threads, kernel == twin, with lanes 8, 16 and the host's default;
    the two builds differ."""
    case = long_rows_case(window)
    before = numba.get_num_threads()
    out = {}
    for lanes in (8, 16):
        try:
            numba.set_num_threads(1)
            one = run(case, lanes=lanes)
        finally:
            numba.set_num_threads(before)
        out[lanes] = run(case, lanes=lanes)
        assert_bitwise(out[lanes], one)
        assert_bitwise(out[lanes], twin(case, lanes))
    assert_bitwise(run(case), out[LANES])
    assert not np.array_equal(out[8], out[16])


@pytest.mark.parametrize("lanes", [8, 16])
def test_dot_is_tinyblas_order(lanes: int) -> None:
    """Lane l sums the elements l, l + lanes, ... with fma, then hsum; a plain sum and the
    other build's lanes differ."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((200, 64)).astype(F32)
    b = rng.standard_normal((200, 64)).astype(F32)
    acc = np.zeros((200, lanes), F32)
    for i in range(64):  # lane by lane, one fma at a time
        acc[:, i % lanes] = fma(a[:, i], b[:, i], acc[:, i % lanes])
    assert_bitwise(dot(a, b, lanes), hsum(acc))
    sequential = np.zeros(200, F32)
    for i in range(64):
        sequential = sequential + a[:, i] * b[:, i]
    assert not np.array_equal(dot(a, b, lanes), sequential)
    assert not np.array_equal(dot(a, b, lanes), dot(a, b, 24 - lanes))
    # a ragged length is padded with zeros: the same as the padded vectors
    assert_bitwise(
        dot(a[:, :37], b[:, :37], lanes),
        dot(np.pad(a[:, :37], [(0, 0), (0, 11)]), np.pad(b[:, :37], [(0, 0), (0, 11)]), lanes),
    )
