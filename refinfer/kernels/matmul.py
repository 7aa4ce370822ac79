"""Matrix product kernels for the float formats: y[T, N] = x[T, K] @ W[N, K]^T.

F32, F16 and BF16 weights, any K. (The block formats Q8_0, Q4_0, Q4_1 have their own
explicit-SIMD kernels in matmul_blocks.py; this file also holds `_stack_empty`, which
both use.) One generic kernel (`_matmul_rows`) walks the rows of W; each format
contributes one tiny inline decoder, `_weight_<fmt>(raw, n, b, j, h, table)`: weight
32 b + 16 h + j of row n as float32 (F16/BF16 through a lookup table, as Numba has no
float16). The NumPy twin is `refinfer.quant.dequantize`.

Reduction order (the determinism contract). Each output y[t, n] is a sum over
k of float32 products w[k] * x[t, k]. It is reduced in 32 lanes: lane i
accumulates the products of k = i, i + 32, i + 64, ... in increasing k (one
float32 multiply, then one float32 add; no fastmath, so never fused into an
FMA), then the 32 lanes are added as a fixed halving tree (lane i += lane
i + 16, then i + 8, ..., i + 1). This order depends on nothing but K: not on T,
not on the thread count, not on the other tokens of the batch. Tokens are
processed in groups of 4, 2 and 1 that share each decoded weight; every group
size does exactly this arithmetic per output, so a token's output is bitwise
the same alone or inside any batch.

Why the loop vectorises (checked with `inspect_asm` on AVX2, see _row_dot_group):
- The loop over 16 lane pairs of a block is innermost; LLVM's loop vectoriser
  turns it into 4 ymm registers of 8 lanes per token. (Numba turns LLVM's SLP
  vectoriser off, so shorter loops, which LLVM unrolls fully first, stay scalar:
  that is why there are 32 lanes and not 8, and why the block formats, where
  speed matters most, use explicit vector code instead.)
- The accumulators live on the stack (`_stack_empty`): LLVM then knows that
  they alias none of x, W, y, and keeps them in ymm registers for a whole row.
- Indices are unsigned (`U(...)`): with signed indices Numba emits negative-index
  wrap-around code that blocks vectorisation.

What limits it: 32 lanes x 4 tokens fill the 16 ymm registers, so T = 8 costs
several times T = 1; and at T = 1 LLVM fully unrolls the F32 one-token body,
which then stays scalar (about 2x slower than it could be).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

U = np.uint64  # index type: unsigned indices skip Numba's negative-index checks
LANES = 32  # partial sums per output; lane i takes k = i (mod 32)
MAX_GROUP = 4  # tokens sharing one pass over a row: 4 x 4 ymm accumulators (AVX2 has 16)


# ---- stack scratch -------------------------------------------------------------


@intrinsic
def _stack_empty(typingctx, rows, cols):
    """float32[rows, cols] on the stack, uninitialised (rows, cols: compile-time constants).

    A stack buffer cannot alias any argument, so LLVM keeps it in registers
    (at G = 4, 16 ymm of accumulators, a few spill back to the stack); it is
    allocated once per call of the parallel body (in its entry block), never per row.
    """
    if not isinstance(rows, types.IntegerLiteral) or not isinstance(cols, types.IntegerLiteral):
        return None
    r, c = rows.literal_value, cols.literal_value
    array_type = types.Array(types.float32, 2, "C")

    def codegen(context, builder, signature, args):
        intp = context.get_value_type(types.intp)
        f32 = context.get_value_type(types.float32)
        buf = cgutils.alloca_once(builder, f32, size=r * c)
        array = make_array(array_type)(context, builder)
        populate_array(
            array,
            data=buf,
            shape=[intp(r), intp(c)],
            strides=[intp(c * 4), intp(4)],
            itemsize=intp(4),
            meminfo=None,
        )
        return array._getvalue()

    return array_type(rows, cols), codegen


# ---- weight decoders: bytes of row n -> float32 weights ------------------------
# `_weight_<fmt>(raw, n, b, j, h, table)` is weight 32*b + 16*h + j of row n
# (j = 0..15, h = 0 or 1), exactly as quant.dequantize computes it.


@njit(inline="always")
def _weight_f32(raw, n, b, j, h, table):
    # raw: float32[N, K];  w = raw[n, k]
    return raw[n, U(b) * U(32) + U(h) * U(16) + U(j)]


@njit(inline="always")
def _weight_16bit(raw, n, b, j, h, table):
    # raw: uint16[N, K] of f16 or bf16 bit patterns;  w = table[raw[n, k]]
    return table[raw[n, U(b) * U(32) + U(h) * U(16) + U(j)]]


# ---- the generic kernel --------------------------------------------------------


@njit(inline="always")
def _row_dot_group(weight, raw, n, table, x, t0, G, K, acc):
    """acc[g, i] = lane i of  sum_k W[n, k] * x[t0 + g, k],  for the G tokens t0..t0+G-1.

    Lane i sums the products of k = i, i + 32, i + 64, ... in increasing k.
    """
    for g in range(G):
        for i in range(LANES):
            acc[U(g), U(i)] = np.float32(0)
    n_blocks = K // 32
    for b in range(n_blocks):
        k0 = U(b * 32)
        for j in range(16):
            w0 = weight(raw, n, b, j, 0, table)  # W[n, k0 + j]: decoded once for G tokens
            w1 = weight(raw, n, b, j, 1, table)  # W[n, k0 + j + 16]
            for g in range(G):
                t = U(t0 + g)
                # acc[g, i] += W[n, k] * x[t, k]   (a multiply, then an add)
                acc[U(g), U(j)] += w0 * x[t, k0 + U(j)]
                acc[U(g), U(j + 16)] += w1 * x[t, k0 + U(j + 16)]
    # Float formats only (K % 32 == 0 for the block formats): the last K % 32 weights.
    k0 = U(n_blocks * 32)
    for i in range(K - n_blocks * 32):
        w = weight(raw, n, n_blocks, i & 15, i >> 4, table)  # W[n, k0 + i]
        for g in range(G):
            acc[U(g), U(i)] += w * x[U(t0 + g), k0 + U(i)]


@njit(inline="always")
def _store_group(acc, G, y, t0, n):
    """y[t0 + g, n] = the 32 lanes of acc[g] added as a fixed tree: 32 -> 16 -> ... -> 1.

    Halving (lane i += lane i + width) keeps the dependency chain 5 adds long.
    """
    for g in range(G):
        width = LANES // 2
        while width >= 1:
            for i in range(width):
                acc[U(g), U(i)] += acc[U(g), U(i + width)]
            width //= 2
        y[U(t0 + g), n] = acc[U(g), U(0)]


@njit
def _locate(counts, unit):
    """(i, j): unit number `unit` of units counted matrix by matrix is unit j of matrix i.

    (A call, not inlined: Numba forbids writing to an alias of a prange index.)"""
    i, j = 0, unit
    while j >= counts[i]:
        j -= counts[i]
        i += 1
    return i, U(j)


@njit(inline="always")
def _matmul_rows(weight, x, raws, table, ys):
    """ys[i][T, N_i] = x[T, K] @ W_i[N_i, K]^T for every matrix of `raws`, rows decoded by
    `weight`; one parallel region over the rows of all of them (W_0's, then W_1's, ...)."""
    T, K = x.shape
    rows = np.empty(len(raws), dtype=np.int64)
    for i in range(len(raws)):
        rows[i] = raws[i].shape[0]
    for unit in prange(rows.sum()):
        i, n = _locate(rows, unit)  # row n of matrix i
        raw, y = raws[i], ys[i]
        acc = _stack_empty(MAX_GROUP, LANES)  # (G, 32): registers, not memory
        t0 = 0
        while T - t0 >= MAX_GROUP:
            _row_dot_group(weight, raw, n, table, x, t0, MAX_GROUP, K, acc)
            _store_group(acc, MAX_GROUP, y, t0, n)
            t0 += MAX_GROUP
        if T - t0 >= 2:
            _row_dot_group(weight, raw, n, table, x, t0, 2, K, acc)
            _store_group(acc, 2, y, t0, n)
            t0 += 2
        if T - t0 == 1:
            _row_dot_group(weight, raw, n, table, x, t0, 1, K, acc)
            _store_group(acc, 1, y, t0, n)


# ---- one entry point per format ------------------------------------------------
# x: float32[T, K] C-contiguous;  raws: a tuple of the matrices' raw arrays;
# ys: a tuple of float32[T, N_i], written;  table: float32[65536].


@njit(cache=True, parallel=True)
def matmul_f32(x, raws, table, ys):
    """raws: float32[N_i, K] (the QTensor bytes viewed as float32); table unused."""
    _matmul_rows(_weight_f32, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_16bit(x, raws, table, ys):
    """raws: uint16[N_i, K] of f16 or bf16 patterns; table: F16_TO_F32 or BF16_TO_F32."""
    _matmul_rows(_weight_16bit, x, raws, table, ys)
