"""Fused dequantise + matrix product kernels: y[T, N] = x[T, K] @ W[N, K]^T.

One generic kernel (`_matmul_rows`) walks the raw rows of W block by block.
Each format contributes one tiny inline decoder, `_weight_<fmt>(raw, n, b, j,
h, table)`: weight 32 b + 16 h + j of row n as float32, read from the stored
bytes. Each `matmul_<fmt>` entry point is a one-line instantiation of the
generic kernel with its decoder (Numba inlines it; the on-disk cache works).
The NumPy twin of every decoder is `refinfer.quant.dequantize`; the tests hold
the weights used here to it bit for bit.

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

Why it is fast (checked with `inspect_asm` on AVX2, see _row_dot_group):
- The loop over 16 lane pairs of a block is innermost; LLVM's loop vectoriser
  turns it into 4 ymm registers of 8 lanes per token. (Numba turns LLVM's SLP
  vectoriser off, so shorter loops, which LLVM unrolls fully first, stay scalar:
  that is why there are 32 lanes and not 8.)
- The accumulators live on the stack (`_stack_empty`): LLVM then knows that
  they alias none of x, W, y, and keeps them in ymm registers for a whole row.
- Indices are unsigned (`U(...)`): with signed indices Numba emits negative-index
  wrap-around code that blocks vectorisation.
- A group of G tokens reads each block once and decodes each weight once for all
  G tokens; a row (a few hundred bytes) stays in L1 across groups, so W streams
  from memory once per call whatever T is.

What limits it (1 thread, 49152 x 576; see bench/bench_kernels.py). T = 1 runs
at ~8 GB/s for q8_0 (near memory speed) but ~3.7 GB/s for the 4-bit formats
(decoding: ~17 cycles a block). T = 8 costs 4-5x T = 1 because 32 lanes x 8
tokens would need 32 ymm accumulators: a group of 4 tokens holds 16, spills a
few, and every block is decoded once per group. Tried and measured against
this design in one process (medians of 15 interleaved runs), none kept:
- FMA accumulation (llvm.fma.f32, exactly rounded): q4_0/q4_1 10-14% faster,
  but with the smaller q8_0 and f16 loop bodies LLVM fully unrolls the G = 1
  loop before the loop vectoriser sees it and leaves it scalar: q8_0 T = 1 5x,
  f16 1.6x slower. The unroll-or-vectorise choice is LLVM's cost heuristic,
  so it cannot be relied on per format.
- Decoding a row once into a float32 scratch row, then dotting every token
  group with it: the scratch (heap) may alias `table` for LLVM, so the block
  scale is reloaded per weight and the decode stays scalar: 10x slower.
- 8 lanes (8 tokens x 1 ymm fit in registers) needs LLVM's SLP vectoriser,
  which Numba reads from numba.core.config.SLP_VECTORIZE (NUMBA_SLP_VECTORIZE,
  off by default) when each library is optimised; it could be scoped to these
  kernels by setting it around their compilation, but globally enabled it
  produced 4-wide xmm code here: 2-5x slower.
- Groups of 2 instead of 4, and a halving tree written with constant trip
  counts (so the accumulators are indexed by constants only): no change.
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
# (j = 0..15, h = 0 or 1): blocks are walked as two halves so that the 4-bit
# formats read byte j once for both its nibbles. Every weight is computed
# exactly as quant.dequantize computes it. The block scale is reloaded per
# weight in the source; LLVM hoists it out of the loop over j.


@njit(inline="always")
def _f16(raw, n, o, table):
    """The little-endian float16 at bytes o, o + 1 of row n, as float32."""
    return table[np.uint32(raw[n, o]) | (np.uint32(raw[n, o + U(1)]) << np.uint32(8))]


@njit(inline="always")
def _weight_f32(raw, n, b, j, h, table):
    # raw: float32[N, K];  w = raw[n, k]
    return raw[n, U(b) * U(32) + U(h) * U(16) + U(j)]


@njit(inline="always")
def _weight_16bit(raw, n, b, j, h, table):
    # raw: uint16[N, K] of f16 or bf16 bit patterns;  w = table[raw[n, k]]
    return table[raw[n, U(b) * U(32) + U(h) * U(16) + U(j)]]


# block_q8_0, 34 bytes:  | d: f16 | qs: int8[32]         |
#                        | 0   1 | 2   3  ...        33 |
@njit(inline="always")
def _weight_q8_0(raw, n, b, j, h, table):
    o = U(b) * U(34)
    d = _f16(raw, n, o, table)
    q = np.int8(raw[n, o + U(2) + U(h) * U(16) + U(j)])
    # w = d * qs[16 h + j]
    return d * np.float32(q)


@njit(inline="always")
def _nibble(byte, h):
    """The low (h = 0) or high (h = 1) 4 bits of a byte."""
    if h == 0:
        return np.uint8(byte & np.uint8(0x0F))
    return np.uint8(byte >> np.uint8(4))


# block_q4_0, 18 bytes:  | d: f16 | qs: uint8[16]                          |
#                        | 0   1 | 2 ... 17                                |
#   byte qs[j] = hi << 4 | lo:  lo is weight j, hi is weight j + 16
@njit(inline="always")
def _weight_q4_0(raw, n, b, j, h, table):
    o = U(b) * U(18)
    d = _f16(raw, n, o, table)
    q = _nibble(raw[n, o + U(2) + U(j)], h)
    # w = d * (q - 8)
    return d * (np.float32(q) - np.float32(8))


# block_q4_1, 20 bytes:  | d: f16 | m: f16 | qs: uint8[16], packed as q4_0 |
#                        | 0   1 | 2   3 | 4 ... 19                        |
@njit(inline="always")
def _weight_q4_1(raw, n, b, j, h, table):
    o = U(b) * U(20)
    d = _f16(raw, n, o, table)
    m = _f16(raw, n, o + U(2), table)
    q = _nibble(raw[n, o + U(4) + U(j)], h)
    # w = d * q + m   (two roundings: a separate multiply and add, no FMA)
    return d * np.float32(q) + m


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


@njit(inline="always")
def _matmul_rows(weight, x, raw, table, y):
    """y[T, N] = x[T, K] @ W[N, K]^T, the rows of W decoded by `weight`."""
    T, K = x.shape
    N = y.shape[1]
    for n_signed in prange(N):
        n = U(n_signed)
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
# x: float32[T, K] C-contiguous;  y: float32[T, N], written;  table: float32[65536].


@njit(cache=True, parallel=True)
def matmul_f32(x, raw, table, y):
    """raw: float32[N, K] (the QTensor bytes viewed as float32); table unused."""
    _matmul_rows(_weight_f32, x, raw, table, y)


@njit(cache=True, parallel=True)
def matmul_16bit(x, raw, table, y):
    """raw: uint16[N, K] of f16 or bf16 patterns; table: F16_TO_F32 or BF16_TO_F32."""
    _matmul_rows(_weight_16bit, x, raw, table, y)


@njit(cache=True, parallel=True)
def matmul_q8_0(x, raw, table, y):
    """raw: uint8[N, K / 32 * 34] of block_q8_0; table: F16_TO_F32."""
    _matmul_rows(_weight_q8_0, x, raw, table, y)


@njit(cache=True, parallel=True)
def matmul_q4_0(x, raw, table, y):
    """raw: uint8[N, K / 32 * 18] of block_q4_0; table: F16_TO_F32."""
    _matmul_rows(_weight_q4_0, x, raw, table, y)


@njit(cache=True, parallel=True)
def matmul_q4_1(x, raw, table, y):
    """raw: uint8[N, K / 32 * 20] of block_q4_1; table: F16_TO_F32."""
    _matmul_rows(_weight_q4_1, x, raw, table, y)
