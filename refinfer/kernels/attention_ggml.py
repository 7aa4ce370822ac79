"""Paged attention as llama.cpp computes it without flash attention (numerics="ggml").

The NumPy twin is `refinfer.ggml.attention.attention` (its docstring reads the graph from
llama.cpp's source); tests/test_ggml_attention.py holds the two together bitwise.
`paged_attention_ggml` has the signature and the visible-key semantics of
`kernels.attention.paged_attention` (same pool layout, same window convention: a query at
p sees keys max(0, p - window + 1) .. p), but not its arithmetic: no online softmax, no
chunks. For each query token t and kv head g, and each of the G query heads h of g:

    q16    = float16(q[t, h])                                        (HD,)
    s_j    = dot(q16, K[j]) * scale          over d: lane d mod 8, fma, then hsum
    M      = max_j s_j
    e_j    = expf_ggml(s_j - M)
    sum    = sum over groups c of 8 keys (key j in lane j mod 8 of group j // 8) of
             double(hsum(e of the group's visible keys, 0 elsewhere)), in increasing c
    p16_j  = float16(e_j * float(1 / sum))
    out[d] = hsum(acc_0[d] .. acc_7[d]),  acc_l[d] = fma(p16_j, V[j, d], acc_l[d])
             over the visible keys j = l mod 8, in increasing j

    hsum(l) = ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))       (float32)

The pool must hold K and V already rounded to float16 (the model writes them so); q and p
are rounded here. Everything of one (t, h) depends only on q[t, h], its sequence's visible
keys and the scale: not on T, the batch, the thread count or the block size, so a token
gives the same bits alone or in any batch, in decode as in prefill.

How it runs: two passes over the visible keys (scores, then values), parallel over
(token, query head) items dealt round-robin to at most MAX_SETS scratch sets, as in
kernels/attention.py. Scores are computed a pool block at a time, vectorised over the
block's keys (K is [KVH, HD, BS]: the keys are contiguous); values vectorised over d
(V is [KVH, BS, HD]). llvm.fma.f32 vectorises to vfmadd.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from refinfer.kernels.expf import expf_ggml_lanes, fma_f32, round_f16

U = np.uint64  # index type: unsigned indices skip Numba's negative-index checks
F32 = np.float32
MAX_LANES = 16  # float32 lanes of tinyBLAS's accumulators and the softmax's groups: 8 or 16
MAX_SETS = 64  # scratch sets per call; many more than threads, so uneven items balance


@njit(inline="always")
def _first_key(pos, window):
    """lo: the first key position a query at `pos` sees."""
    return max(0, pos - window + 1) if window > 0 else 0


@njit(inline="always")
def _hsum(x, i, lanes):
    """ggml.ops.hsum of the lanes x[0 .. lanes - 1, i] (8 or 16): halving, i + lanes / 2 ...
    For 8: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    if lanes == 16:  # (l_k + l_k+8), then the 8-lane tree
        a0, a1 = x[0, i] + x[8, i], x[1, i] + x[9, i]
        a2, a3 = x[2, i] + x[10, i], x[3, i] + x[11, i]
        a4, a5 = x[4, i] + x[12, i], x[5, i] + x[13, i]
        a6, a7 = x[6, i] + x[14, i], x[7, i] + x[15, i]
        return ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
    a0, a1 = x[0, i] + x[4, i], x[1, i] + x[5, i]
    a2, a3 = x[2, i] + x[6, i], x[3, i] + x[7, i]
    return (a0 + a2) + (a1 + a3)


@njit(inline="always")
def _scores(q16, k_cache, table, g, lo, pos, W, lanes, s):
    """s[j - lo] = dot(q16, K[key j]) for the keys j = lo .. pos (unscaled, float32).

    lanes: float32[W, >= n] scratch: lane d mod W of each key, accumulated over d in order.
    """
    HD, BS = k_cache.shape[2], k_cache.shape[3]
    n = pos - lo + 1
    for L in range(W):
        for j in range(n):
            lanes[U(L), U(j)] = F32(0)
    for i in range(lo // BS, pos // BS + 1):  # the pool blocks of the keys, in order
        blk = table[i]
        j0, j1 = max(lo - i * BS, 0), min(pos - i * BS + 1, BS)  # its slots in lo .. pos
        col = i * BS - lo  # slot jj is column col + jj
        for d in range(HD):
            L, qd = d % W, q16[U(d)]
            for jj in range(j0, j1):
                lanes[U(L), U(col + jj)] = fma_f32(
                    qd, k_cache[U(blk), U(g), U(d), U(jj)], lanes[U(L), U(col + jj)]
                )
    for j in range(n):
        s[U(j)] = _hsum(lanes, U(j), W)


@njit(inline="always")
def _probabilities(s, n, lo, scale, W, lanes):
    """s[0 .. n-1] (scores of keys lo .. lo + n - 1) -> float16-rounded softmax(s * scale).

    ggml_vec_soft_max_f32: groups of W by key position, each summed by hsum in float32,
    the groups added in double; p = e * float(1 / sum). lanes: float32[W, >= 1] scratch.
    """
    top = F32(-np.inf)
    for j in range(n):  # w = s * scale;  M = max w
        s[U(j)] = s[U(j)] * scale
        top = max(top, s[U(j)])
    for j in range(n):
        s[U(j)] = expf_ggml_lanes(s[U(j)] - top, W)
    total = 0.0
    pos = lo + n - 1
    for c in range(lo // W, pos // W + 1):  # groups of W key positions, in order
        for L in range(W):
            key = c * W + L
            lanes[U(L), 0] = s[U(key - lo)] if lo <= key <= pos else F32(0)
        total += np.float64(_hsum(lanes, 0, W))
    inv = F32(1.0 / total)
    for j in range(n):
        s[U(j)] = round_f16(s[U(j)] * inv)


@njit(inline="always")
def _values(p16, v_cache, table, g, lo, pos, W, acc, out, t, h):
    """out[t, h] = dot over the keys lo .. pos of p16 and V (lane: key position mod W).

    acc: float32[W, HD] scratch.
    """
    BS, HD = v_cache.shape[2], v_cache.shape[3]
    for L in range(W):
        for d in range(HD):
            acc[U(L), U(d)] = F32(0)
    for i in range(lo // BS, pos // BS + 1):
        blk = table[i]
        j0, j1 = max(lo - i * BS, 0), min(pos - i * BS + 1, BS)
        for jj in range(j0, j1):
            key = i * BS + jj
            L, p = key % W, p16[U(key - lo)]
            for d in range(HD):
                acc[U(L), U(d)] = fma_f32(p, v_cache[U(blk), U(g), U(jj), U(d)], acc[U(L), U(d)])
    for d in range(HD):
        out[U(t), U(h), U(d)] = _hsum(acc, U(d), W)


@njit(inline="always")
def _attend(q, k_cache, v_cache, table, t, h, pos, window, scale, W, out, q16, s, lanes, acc):
    """out[t, h] for query head h of token t (one work item), over kv head h // G."""
    H, HD = q.shape[1], q.shape[2]
    g = h // (H // k_cache.shape[1])
    lo = _first_key(pos, window)
    for d in range(HD):
        q16[U(d)] = round_f16(q[U(t), U(h), U(d)])
    _scores(q16, k_cache, table, g, lo, pos, W, lanes, s)
    _probabilities(s, pos - lo + 1, lo, scale, W, lanes)
    _values(s, v_cache, table, g, lo, pos, W, acc, out, t, h)


@njit(cache=True, parallel=True)
def _attend_all(q, k_cache, v_cache, block_tables, seq_index, positions, window, scale, W, out):
    T, H, HD = q.shape
    n_items = T * H  # (token, query head) pairs: a decode step has H of them to share out
    n_sets = max(1, min(n_items, MAX_SETS))
    longest = 1  # the most keys any token sees
    for t in range(T):
        longest = max(longest, positions[t] - _first_key(positions[t], window) + 1)
    q16 = np.empty((n_sets, HD), dtype=np.float32)  # per set: the float16-rounded query
    s = np.empty((n_sets, longest), dtype=np.float32)  # scores, then probabilities
    lanes = np.empty((n_sets, MAX_LANES, longest), dtype=np.float32)  # score lanes
    acc = np.empty((n_sets, MAX_LANES, HD), dtype=np.float32)  # value lanes
    for k in prange(n_sets):
        for item in range(k, n_items, n_sets):  # round-robin: item i -> set i % n_sets
            t, h = item // H, item % H
            _attend(
                q, k_cache, v_cache, block_tables[seq_index[t]], t, h, positions[t], window,
                scale, W, out, q16[k], s[k], lanes[k], acc[k],
            )  # fmt: skip


def paged_attention_ggml(q, k_cache, v_cache, block_tables, seq_index, positions, window, scale,
                         out, lanes=None):  # fmt: skip
    """out[t, h] = llama.cpp's (non-flash) attention of q[t, h] over its sequence's paged K/V.

    Arguments as kernels.attention.paged_attention: q float32[T, H, HD] (RoPE applied, not
    scaled), out float32[T, H, HD] (written); k_cache float32[n_blocks, KVH, HD, BS] and
    v_cache float32[n_blocks, KVH, BS, HD] holding float16-rounded values; block_tables
    int32[S, max_blocks]; seq_index, positions int32[T]; window (0: none); scale: kq_scale,
    applied to the float32 score after the dot product (ggml.ops.kq_scale(HD) for
    llama.cpp's models; Gemma 3 scales q before, and kq_scale is 1). lanes: 8 (AVX2) or 16
    (AVX-512) as llama.cpp's build (default: this host's, ggml.ops.host_simd).
    """
    from refinfer.ggml.ops import LANES

    _attend_all(
        q, k_cache, v_cache, block_tables, seq_index, positions, window, np.float32(scale),
        LANES if lanes is None else lanes, out,
    )  # fmt: skip
