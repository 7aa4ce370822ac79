"""llama.cpp's attention without flash attention, for one sequence, in NumPy.

Where this sits: in numerics="ggml" the layer's attention is what llm_graph_context::
build_attn_mha builds when flash attention is off (llama-cpp-python's default), run by
ggml's CPU backend. kernels/attention_ggml.py computes the same bits over the paged pool;
tests/test_ggml_attention.py holds the two together. The graph, read from the source:

    kq  = mul_mat(k, q)              K is F16 (the cache): q is converted to F16 first,
                                     then tinyBLAS (llamafile sgemm) F16 x F16 -> F32
    kq  = soft_max_ext(kq, mask, kq_scale)   ggml_compute_forward_soft_max_f32 (ops.softmax)
    kqv = mul_mat(v^T, kq)           V is F16 (stored transposed): the probabilities are
                                     converted to F16, then tinyBLAS again

tinyBLAS on AVX2 + F16C (sgemm.cpp, tinyBLAS<8, __m256, __m256, ggml_fp16_t, ...>) reduces
each dot product the same way whatever the tile: 8 float32 lanes, lane l accumulating the
elements l, l + 8, l + 16, ... in increasing order with vfmadd (from 0), then `hsum`:

    dot(a, b) = hsum(lane_0 .. lane_7),   lane_l = fma(a_i, b_i, lane_l) for i = l mod 8

It needs the reduced length to be a multiple of 8 (else ggml falls back to
ggml_vec_dot_f16, another order). For the scores that length is HD (every model has
HD % 8 == 0; here a ragged HD is padded with zeros, which adds nothing); for the values it
is the KV cache's n_kv, which llama.cpp pads to a multiple of 256 cells with masked
entries. In one sequence from an empty cache, cell j holds position j, so the lanes and
the softmax's groups of 8 go by key position: key j is in lane j mod 8 of group j // 8.
Masked keys give p = 0 exactly, and fma(0, v, acc) = acc, so only the visible keys count.

An AVX-512 build does the same with 16 lanes (tinyBLAS<16, __m512, ...>, and the softmax's
expf and sums): `lanes`=16, ops.Simd. Several sequences in one llama.cpp cache, or cells
reused after
a rollback, put keys at other cells and so in other lanes; this twin assumes positions.
"""

from __future__ import annotations

import numpy as np

from refinfer.ggml.ops import F32, LANES, fma, hsum, round_f16, softmax


def dot(a: np.ndarray, b: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """tinyBLAS's float32 dot product of a[..., n] and b[..., n] (broadcast): see the docstring.

    acc_l = fma(a_i, b_i, acc_l) over i = l, l + lanes, ... in order, from 0; then hsum.
    A length that is not a multiple of `lanes` is padded with zeros (each adds nothing).
    """
    a, b = np.broadcast_arrays(np.asarray(a, dtype=F32), np.asarray(b, dtype=F32))
    pad = [(0, 0)] * (a.ndim - 1) + [(0, -a.shape[-1] % lanes)]
    a, b = np.pad(a, pad), np.pad(b, pad)
    acc = np.zeros(a.shape[:-1] + (lanes,), dtype=F32)
    for i in range(0, a.shape[-1], lanes):
        acc = fma(a[..., i : i + lanes], b[..., i : i + lanes], acc)
    return hsum(acc)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float,
    lanes: int = LANES,
) -> np.ndarray:  # fmt: skip
    """llama.cpp's attention: q[T, H, HD], k and v [n, KVH, HD] of one sequence -> [T, H, HD].

    Key j of k and v is position j (cell j). mask: bool[T, n], True where query t sees key j
    (reference.attention_mask). Query head h reads K/V head h // (H / KVH). scale: kq_scale
    (float32; ops.kq_scale(HD) for llama.cpp's models, 1 for Gemma 3, which scales q).

        q16, k16, v16 = float16 roundings of q, k, v
        s_tj   = dot(q16_t, k16_j)                   float32, tinyBLAS order, unscaled
        p_t    = ops.softmax(s_t, scale, mask_t)     row padded to whole groups (n_kv)
        out_t  = sum_j float16(p_tj) v16_j           dot over the keys, lane j mod lanes
    lanes: 8 (AVX2) or 16 (AVX-512), ops.Simd.
    """
    T, H, HD = q.shape
    n, KVH = k.shape[:2]
    group = H // KVH
    pad = -n % lanes  # n_kv is a multiple of 256 in llama.cpp: masked cells fill it
    k16 = np.pad(round_f16(k), [(0, pad), (0, 0), (0, 0)])  # (n8, KVH, HD)
    v16 = np.pad(round_f16(v), [(0, pad), (0, 0), (0, 0)])
    seen = np.pad(np.asarray(mask, dtype=bool), [(0, 0), (0, pad)])  # (T, n8)
    q16 = round_f16(q)
    kh = np.repeat(k16, group, axis=1).transpose(1, 0, 2)  # (H, n8, HD): head h's keys
    vh = np.repeat(v16, group, axis=1).transpose(1, 2, 0)  # (H, HD, n8)
    s = dot(q16[:, :, None, :], kh[None], lanes)  # (T, H, n8)
    additive = np.where(seen, F32(0), F32(-np.inf))[:, None, :]  # (T, 1, n8)
    p16 = round_f16(softmax(s, scale, additive, lanes))  # (T, H, n8)
    return dot(p16[:, :, None, :], vh[None], lanes)  # (T, H, HD)
