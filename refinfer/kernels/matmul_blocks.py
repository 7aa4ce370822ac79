"""The block-format matmul kernels (Q8_0, Q4_0, Q4_1) in explicit 8-wide SIMD.

y[T, N] = x[T, K] @ W[N, K]^T with W in its GGUF blocks of 32 weights. For a tile of R
rows x G tokens, each block of each row is decoded ONCE into four <8 x float> vectors,
and every token of the tile then adds it into its own 8-lane accumulator with four fused
multiply-adds. Numba has no vector type and switches off LLVM's SLP vectoriser, so the
block step is written as one small LLVM intrinsic per format (`_block_<fmt>`); the loops
around it are ordinary Numba. The NumPy twin is quant.dequantize followed by a product.

Reduction order (the determinism contract). y[t, n] is reduced in 8 lanes: lane i sums
k = i, i + 8, i + 16, ... in increasing k, one exactly rounded FMA per product
(acc = fma(w, x, acc)); then the lanes are added as a fixed tree (i + 4, i + 2, i + 1).
The order depends only on K: not on T, on the tile, on the thread count or on the other
tokens. The weight w is the float32 quant.dequantize gives (a plain multiply, never fused).

Tiles R x G: 1 x 8 while 8 tokens remain, then 2 x 4, 2 x 2, 2 x 1. With one row and one
token, the 4 FMAs of a block form one dependent chain (latency-bound); two rows give two
chains. The 8 x 8 accumulators live on the stack, where LLVM keeps them in ymm registers.
Rows are interleaved in a tile, which the hardware prefetcher follows badly, so each row
is prefetched PREFETCH_BYTES ahead (a prefetch never faults, even past the array's end).

Measured (1 thread, 49152 x 576, A/B against the 32-lane loop kernel in matmul.py):
q8_0 T = 1 1.05-1.2x faster, T = 8 1.9-2.3x; q4_0 T = 1 1.27x, T = 8 2.3-2.7x.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from refinfer.kernels.matmul import _stack_empty

U = np.uint64  # unsigned indices: no negative-index wrap-around code
PREFETCH_BYTES = 512

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
V8F = ir.VectorType(F32, 8)  # one ymm register of 8 float32


# ---- LLVM helpers ------------------------------------------------------------------


def _load(builder, base, offset, vtype):
    """Unaligned load of a `vtype` at base + offset (offset in elements of base)."""
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vtype.as_pointer()), align=1)


def _store(builder, value, base, offset):
    """Store `value` at base + offset."""
    builder.store(value, builder.bitcast(builder.gep(base, [offset]), value.type.as_pointer()))


def _splat(builder, scalar):
    """<8 x float> with every lane = scalar."""
    v = builder.insert_element(ir.Constant(V8F, ir.Undefined), scalar, I32(0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 8), [0] * 8))


def _f16(builder, raw, table, offset):
    """The little-endian float16 at raw[offset], as float32, through the lookup table."""
    bits = builder.load(builder.bitcast(builder.gep(raw, [offset]), I16.as_pointer()), align=1)
    return builder.load(builder.gep(table, [builder.zext(bits, I64)]))


def _to_float(builder, q8, scale):
    """<8 x i8> quants -> <8 x float> weights scale * float(q) (a plain multiply)."""
    return builder.fmul(scale, builder.sitofp(q8, V8F))


def _nibbles(builder, qs):
    """<16 x i8> packed quants -> <32 x i8>: low nibbles are weights 0..15, high 16..31."""
    v16 = qs.type
    lo = builder.and_(qs, ir.Constant(v16, [0x0F] * 16))
    hi = builder.lshr(qs, ir.Constant(v16, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))


def _chunks(builder, q32):
    """<32 x i8> -> four <8 x i8>: weights 0-7, 8-15, 16-23, 24-31."""
    idx = [ir.Constant(ir.VectorType(I32, 8), list(range(8 * c, 8 * c + 8))) for c in range(4)]
    return [builder.shuffle_vector(q32, q32, i) for i in idx]


# ---- one decoder per format: bytes of a block -> 4 x <8 x float> weights -----------


# block_q8_0, 34 bytes:  | d: f16 | qs: int8[32] |          w[j] = d * qs[j]
def _decode_q8_0(builder, raw, table, o):
    d = _splat(builder, _f16(builder, raw, table, o))
    qs = _load(builder, raw, builder.add(o, I64(2)), ir.VectorType(I8, 32))
    return [_to_float(builder, q, d) for q in _chunks(builder, qs)]


# block_q4_0, 18 bytes:  | d: f16 | qs: uint8[16], byte j = weight j | weight j+16 << 4 |
# w = d * (q - 8); q - 8 is exact in int8, so this is quant.dequantize's d * float(q - 8)
def _decode_q4_0(builder, raw, table, o):
    d = _splat(builder, _f16(builder, raw, table, o))
    q = _nibbles(builder, _load(builder, raw, builder.add(o, I64(2)), ir.VectorType(I8, 16)))
    q = builder.sub(q, ir.Constant(q.type, [8] * 32))
    return [_to_float(builder, c, d) for c in _chunks(builder, q)]


# block_q4_1, 20 bytes:  | d: f16 | m: f16 | qs: uint8[16], packed as q4_0 |
# w = d * q + m   (a multiply, then an add: two roundings, never fused)
def _decode_q4_1(builder, raw, table, o):
    d = _splat(builder, _f16(builder, raw, table, o))
    m = _splat(builder, _f16(builder, raw, table, builder.add(o, I64(2))))
    q = _nibbles(builder, _load(builder, raw, builder.add(o, I64(4)), ir.VectorType(I8, 16)))
    return [builder.fadd(_to_float(builder, c, d), m) for c in _chunks(builder, q)]


def _block_intrinsic(decode):
    """The block step for one format, as a Numba intrinsic.

    _block(acc, raw, offset, row_bytes, table, x, x_offset, K, R, G), R and G literals:
    row r's block starts at raw.flat[offset + r * row_bytes]; its weights w0..w3 (4 x 8)
    are decoded once; for token g < G (x.flat[x_offset + g * K + ...]):
        acc[r * G + g] = fma(w3, x3, fma(w2, x2, fma(w1, x1, fma(w0, x0, acc[r * G + g]))))
    """

    def typer(typingctx, acc, raw, offset, row_bytes, table, x, x_offset, K, R, G):
        if not (isinstance(R, types.IntegerLiteral) and isinstance(G, types.IntegerLiteral)):
            return None
        n_rows, n_tokens = R.literal_value, G.literal_value

        def codegen(context, builder, sig, args):
            acc_p, raw_p, table_p, x_p = (
                make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 1, 4, 5)
            )
            offset, row_bytes, x_offset, K = args[2], args[3], args[6], args[7]
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(V8F, [V8F] * 3), "llvm.fma.v8f32"
            )
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
                "llvm.prefetch.p0",
            )  # fmt: skip
            for r in range(n_rows):
                o = builder.add(offset, builder.mul(row_bytes, I64(r)))
                ahead = builder.gep(raw_p, [builder.add(o, I64(PREFETCH_BYTES))])
                builder.call(prefetch, [ahead, I32(0), I32(3), I32(1)])  # read, keep, data
                w = decode(builder, raw_p, table_p, o)
                for g in range(n_tokens):
                    slot = I64(8 * (r * n_tokens + g))
                    a = _load(builder, acc_p, slot, V8F)
                    x_g = builder.add(x_offset, builder.mul(K, I64(g)))
                    for c in range(4):
                        x_c = _load(builder, x_p, builder.add(x_g, I64(8 * c)), V8F)
                        a = builder.call(fma, [w[c], x_c, a])
                    _store(builder, a, acc_p, slot)
            return context.get_dummy_value()

        return types.none(acc, raw, offset, row_bytes, table, x, x_offset, K, R, G), codegen

    return intrinsic(typer)


_block_q8_0 = _block_intrinsic(_decode_q8_0)
_block_q4_0 = _block_intrinsic(_decode_q4_0)
_block_q4_1 = _block_intrinsic(_decode_q4_1)


# ---- the kernel around the block step ------------------------------------------------


@njit(inline="always")
def _tile(block, block_bytes, raw, n0, table, x, t0, K, y, acc, R, G):
    """y[t0 : t0 + G, n0 : n0 + R] for a tile of R rows x G tokens."""
    for i in range(R * G):
        for lane in range(8):
            acc[U(i), U(lane)] = np.float32(0)
    row_bytes = U(raw.shape[1])
    for b in range(K // 32):
        block(acc, raw, n0 * row_bytes + U(b * block_bytes), row_bytes, table,
              x, U(t0) * U(K) + U(b * 32), U(K), R, G)  # fmt: skip
    for r in range(R):
        for g in range(G):
            i = U(r * G + g)
            # the fixed tree over the 8 lanes: (0+4, 1+5, 2+6, 3+7), then pairs, then one
            a0 = acc[i, U(0)] + acc[i, U(4)]
            a1 = acc[i, U(1)] + acc[i, U(5)]
            a2 = acc[i, U(2)] + acc[i, U(6)]
            a3 = acc[i, U(3)] + acc[i, U(7)]
            y[U(t0 + g), n0 + U(r)] = (a0 + a2) + (a1 + a3)


@njit(inline="always")
def _row_pair(block, block_bytes, x, raw, table, y, n0, acc):
    """Rows n0, n0 + 1 against all T tokens: tiles 1 x 8 (each row), then 2 x 4, 2 x 2, 2 x 1."""
    T, K = x.shape
    t0 = 0
    while T - t0 >= 8:
        _tile(block, block_bytes, raw, n0, table, x, t0, K, y, acc, 1, 8)
        _tile(block, block_bytes, raw, n0 + U(1), table, x, t0, K, y, acc, 1, 8)
        t0 += 8
    if T - t0 >= 4:
        _tile(block, block_bytes, raw, n0, table, x, t0, K, y, acc, 2, 4)
        t0 += 4
    if T - t0 >= 2:
        _tile(block, block_bytes, raw, n0, table, x, t0, K, y, acc, 2, 2)
        t0 += 2
    if T - t0 == 1:
        _tile(block, block_bytes, raw, n0, table, x, t0, K, y, acc, 2, 1)


@njit(inline="always")
def _last_row(block, block_bytes, x, raw, table, y, n, acc):
    """Row n alone (the last row when N is odd): tiles 1 x 8, then 1 x 1."""
    T, K = x.shape
    t0 = 0
    while T - t0 >= 8:
        _tile(block, block_bytes, raw, n, table, x, t0, K, y, acc, 1, 8)
        t0 += 8
    while t0 < T:
        _tile(block, block_bytes, raw, n, table, x, t0, K, y, acc, 1, 1)
        t0 += 1


@njit(inline="always")
def _matmul_blocks(block, block_bytes, x, raw, table, y):
    """y[T, N] = x[T, K] @ W[N, K]^T, in parallel over pairs of rows."""
    N = y.shape[1]
    for pair in prange(N // 2):
        acc = _stack_empty(8, 8)  # (R * G, 8 lanes): 8 ymm registers
        _row_pair(block, block_bytes, x, raw, table, y, U(pair) * U(2), acc)
    acc = _stack_empty(8, 8)
    for n in range(N - N % 2, N):
        _last_row(block, block_bytes, x, raw, table, y, U(n), acc)


# x: float32[T, K] C-contiguous;  raw: uint8[N, row_bytes];  table: F16_TO_F32;  y: float32[T, N]


@njit(cache=True, parallel=True)
def matmul_q8_0(x, raw, table, y):
    """y = x @ W^T for W in block_q8_0."""
    _matmul_blocks(_block_q8_0, 34, x, raw, table, y)


@njit(cache=True, parallel=True)
def matmul_q4_0(x, raw, table, y):
    """y = x @ W^T for W in block_q4_0."""
    _matmul_blocks(_block_q4_0, 18, x, raw, table, y)


@njit(cache=True, parallel=True)
def matmul_q4_1(x, raw, table, y):
    """y = x @ W^T for W in block_q4_1."""
    _matmul_blocks(_block_q4_1, 20, x, raw, table, y)
