"""The block-format matmul kernels, in explicit 8-wide SIMD: every quantised GGUF type.

y[T, N] = x[T, K] @ W[N, K]^T with W in its GGUF blocks: 32 weights (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, IQ4_NL) or 256-weight super-blocks (Q2_K .. Q6_K, IQ4_XS). For a tile of
R rows x G tokens, each block of each row is decoded ONCE (a super-block's sub-block
scales included), eight weights at a time into <8 x float> vectors, and every token of
the tile adds each vector into its own 8-lane accumulator with one fused multiply-add.
Numba has no vector type and switches off LLVM's SLP vectoriser, so the block step is
written as one small LLVM intrinsic per format (`_block_<fmt>`) around a decoder (a
Python generator that emits the IR of one block and yields its weights in order of k);
the loops around it are ordinary Numba. The NumPy twin is quant.dequantize followed by
a product: each decoder states the same formula, in the same float operations, as the
quant.py function of its format.

Reduction order (the determinism contract). y[t, n] is reduced in 8 lanes: lane i sums
k = i, i + 8, i + 16, ... in increasing k, one exactly rounded FMA per product
(acc = fma(w, x, acc)); then the lanes are added as a fixed tree (i + 4, i + 2, i + 1).
The order depends only on K: not on T, on the tile, on the thread count or on the other
tokens, and it is the same for every format. The weight w is the float32
quant.dequantize gives (plain multiplies and adds, never fused).

Work is split into units of 4 rows x TOKEN_BLOCK tokens, token block by token block,
so that each thread's 64 rows of x stay in cache while the rows of W stream past; one
parallel region covers every matrix of the call (Wq, Wk and Wv together). Tiles R x G
within a unit: 1 x 8 while 8 tokens remain (the one row's decoded weights serve 8
tokens; 2 x 4 measured 15% slower on Zen 1), then 2 x 4, 2 x 2, and 4 x 1 for a single
token (four independent FMA chains; the same speed as 2 x 1 on Zen 1, where decoding is
bound by the int8 -> float32 conversions, not by FMA latency). The accumulators live on
the stack, where LLVM keeps them in ymm registers. Rows are interleaved in a tile, which
the hardware prefetcher follows badly, so each row's block is prefetched PREFETCH_BYTES ahead (a
prefetch never faults, even past the array's end): at 512 bytes a decode step of SmolLM2
Q8_0 spent 26 ms in matmul on this 2-core Zen 1, at 6 KiB 18 ms (weights stream from
DRAM; the kernel's arithmetic alone runs at about 5 GB/s per core).

Portability: everything is target-independent LLVM IR except one table lookup (IQ4's
16 non-linear levels), which uses SSSE3's pshufb where the target has it and a
lane-by-lane lookup elsewhere (tests/test_kernels.py runs both).

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

from refinfer import quant
from refinfer.kernels.matmul import _locate, _stack_empty

U = np.uint64  # unsigned indices: no negative-index wrap-around code
PREFETCH_BYTES = 6144  # see above: 1.5, 3, 4 and 12 KiB measured slower
TOKEN_BLOCK = 64  # tokens of x (64 x K floats: within L2) per unit of work
CACHE_LINE = 64

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
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


# ---- integer vectors: the bit fields of a block ---------------------------------------


def _vec(builder, raw, offset, n):
    """<n x i8>: the n bytes at raw[offset]."""
    return _load(builder, raw, offset, ir.VectorType(I8, n))


def _const(v, value):
    """A constant of v's vector type: lane i = value[i] for a list, else every lane = value."""
    return ir.Constant(v.type, value if isinstance(value, list) else [value] * v.type.count)


def _field(builder, v, shift, mask):
    """(v >> shift) & mask, lane by lane (a bit field of each byte; shift, mask: int or list)."""
    return builder.and_(builder.lshr(v, _const(v, shift)), _const(v, mask))


def _shuffle(builder, v, idx):
    """<len(idx) x ...>: lane i = v[idx[i]]."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, len(idx)), idx))


def _lane(builder, v, i):
    """<8 x float> with every lane = lane i of v."""
    return _shuffle(builder, v, [i] * 8)


def _scales(builder, q, d, signed=False):
    """<n x i8> small integer scales -> <n x float> d * float(q)  (ggml's d * sc)."""
    convert = builder.sitofp if signed else builder.uitofp
    return builder.fmul(
        _splat_n(builder, d, q.type.count), convert(q, ir.VectorType(F32, q.type.count))
    )


def _splat_n(builder, scalar, n):
    """<n x float> with every lane = scalar."""
    v = builder.insert_element(ir.Constant(ir.VectorType(F32, n), ir.Undefined), scalar, I32(0))
    return _shuffle(builder, v, [0] * n)


def _weights(builder, q32, scale, minus=None, plus=None):
    """32 quants (<32 x i8>, signed) -> four <8 x float>: scale * float(q) (- minus) (+ plus).

    `scale` and `minus` are <8 x float> per chunk (lists of 4) or one for all four;
    `plus` (Q4_1 / Q5_1's m) is one for all four.
    """
    for c, q in enumerate(_chunks(builder, q32)):
        q = builder.sext(q, ir.VectorType(I32, 8))
        minus_c = None if minus is None else _of_chunk(minus, c)
        yield _weight8(builder, q, _of_chunk(scale, c), minus=minus_c, plus=plus)


def _of_chunk(v, c):
    """Chunk c's vector of a per-chunk list, or the one vector shared by all chunks."""
    return v[c] if isinstance(v, list) else v


def _splat_u32(builder, raw, offset):
    """<8 x i32> with every lane = the little-endian uint32 at raw[offset].

    One broadcast load: a sub-block's scale reaches all 8 lanes without a shuffle, which
    matters where every 16 weights have their own scale (measured against a <16 x float>
    of scales and one lane shuffle per sub-block: Q2_K 1.25x faster at T = 1; Q2_K, Q3_K,
    Q6_K at T = 8 about 2x). The 4 bytes read must lie inside the block.
    """
    word = builder.load(builder.bitcast(builder.gep(raw, [offset]), I32.as_pointer()), align=1)
    v = builder.insert_element(ir.Constant(ir.VectorType(I32, 8), ir.Undefined), word, I32(0))
    return _shuffle(builder, v, [0] * 8)


def _bits8(builder, raw, offset, shift, mask):
    """<8 x i32>: (byte >> shift) & mask of the 8 bytes at raw[offset] (a zero-extending load)."""
    v = builder.zext(_vec(builder, raw, offset, 8), ir.VectorType(I32, 8))
    return _field(builder, v, shift, mask)


def _weight8(builder, q, scale, minus=None, plus=None):
    """<8 x i32> quants -> <8 x float> scale * float(q) (- minus) (+ plus)."""
    w = builder.fmul(scale, builder.sitofp(q, V8F))
    if minus is not None:
        w = builder.fsub(w, minus)
    if plus is not None:
        w = builder.fadd(w, plus)
    return w


def _high_bits(builder, raw, offset):
    """<32 x i8>: lane j = bit j of the little-endian uint32 at raw[offset] (q5's qh), as 0/1."""
    qh = _shuffle(builder, _vec(builder, raw, offset, 4), [j // 8 for j in range(32)])
    bit = ir.Constant(qh.type, [1 << (j % 8) for j in range(32)])
    return builder.zext(builder.icmp_unsigned("!=", builder.and_(qh, bit), _const(qh, 0)), qh.type)


def _lookup16(builder, table, idx, ssse3):
    """<16 x i8>: lane i = table[idx[i]] for a constant 16-entry table and indices 0..15.

    One pshufb where the target has SSSE3; otherwise lane by lane (portable LLVM IR).
    """
    if ssse3:
        pshufb = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(idx.type, [idx.type, idx.type]),
            "llvm.x86.ssse3.pshuf.b.128",
        )  # fmt: skip
        return builder.call(pshufb, [table, idx])
    out = ir.Constant(idx.type, ir.Undefined)
    for i in range(16):
        value = builder.extract_element(table, builder.extract_element(idx, I32(i)))
        out = builder.insert_element(out, value, I32(i))
    return out


def _has_ssse3(context):
    """Whether the code being compiled may use SSSE3 (Numba's target features, not the host's)."""
    return "+ssse3" in context.codegen()._tm_features.split(",")


# ---- one decoder per format: bytes of a block -> its weights, 8 at a time ------------
# `_decode_<fmt>(builder, raw, table, o, ssse3)` emits the IR that reads the block at
# raw[o] and yields its weights as <8 x float>, k = 0-7, 8-15, ... (the order of the
# reduction). Each states the formula of quant._dequantize_<fmt>, in the same operations.


# block_q8_0, 34 bytes:  | d: f16 | qs: int8[32] |          w[j] = d * qs[j]
def _decode_q8_0(builder, raw, table, o, ssse3):
    d = _splat(builder, _f16(builder, raw, table, o))
    yield from _weights(builder, _vec(builder, raw, builder.add(o, I64(2)), 32), d)


# block_q4_0, 18 bytes:  | d: f16 | qs: uint8[16], byte j = weight j | weight j+16 << 4 |
# w = d * (q - 8); q - 8 is exact in int8, so this is quant.dequantize's d * float(q - 8)
def _decode_q4_0(builder, raw, table, o, ssse3):
    d = _splat(builder, _f16(builder, raw, table, o))
    q = _nibbles(builder, _vec(builder, raw, builder.add(o, I64(2)), 16))
    yield from _weights(builder, builder.sub(q, _const(q, 8)), d)


# block_q4_1, 20 bytes:  | d: f16 | m: f16 | qs: uint8[16], packed as q4_0 |
# w = d * q + m   (a multiply, then an add: two roundings, never fused)
def _decode_q4_1(builder, raw, table, o, ssse3):
    d = _splat(builder, _f16(builder, raw, table, o))
    m = _splat(builder, _f16(builder, raw, table, builder.add(o, I64(2))))
    q = _nibbles(builder, _vec(builder, raw, builder.add(o, I64(4)), 16))
    yield from _weights(builder, q, d, plus=m)


# block_q5_0, 22 bytes:  | d: f16 | qh: uint32 | qs: uint8[16] |
# q = nibble | (bit j of qh) << 4;  w = d * (q - 16)
def _decode_q5_0(builder, raw, table, o, ssse3):
    d = _splat(builder, _f16(builder, raw, table, o))
    high = _high_bits(builder, raw, builder.add(o, I64(2)))
    q = _nibbles(builder, _vec(builder, raw, builder.add(o, I64(6)), 16))
    q = builder.or_(q, builder.shl(high, _const(high, 4)))
    yield from _weights(builder, builder.sub(q, _const(q, 16)), d)


# block_q5_1, 24 bytes:  | d: f16 | m: f16 | qh: uint32 | qs: uint8[16] |   w = d * q + m
def _decode_q5_1(builder, raw, table, o, ssse3):
    d = _splat(builder, _f16(builder, raw, table, o))
    m = _splat(builder, _f16(builder, raw, table, builder.add(o, I64(2))))
    high = _high_bits(builder, raw, builder.add(o, I64(4)))
    q = _nibbles(builder, _vec(builder, raw, builder.add(o, I64(8)), 16))
    yield from _weights(builder, builder.or_(q, builder.shl(high, _const(high, 4))), d, plus=m)


def _iq4(builder, raw, offset, ssse3):
    """<32 x i8> kvalues_iq4nl[q] for the 32 nibbles packed as q4_0 in the 16 bytes at offset."""
    kvalues = ir.Constant(ir.VectorType(I8, 16), [int(v) for v in quant.KVALUES_IQ4NL])
    qs = _vec(builder, raw, offset, 16)
    lo = _lookup16(builder, kvalues, builder.and_(qs, _const(qs, 0x0F)), ssse3)
    hi = _lookup16(builder, kvalues, builder.lshr(qs, _const(qs, 4)), ssse3)
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))


# block_iq4_nl, 18 bytes:  | d: f16 | qs: uint8[16], packed as q4_0 |   w = d * kvalues[q]
def _decode_iq4_nl(builder, raw, table, o, ssse3):
    d = _splat(builder, _f16(builder, raw, table, o))
    yield from _weights(builder, _iq4(builder, raw, builder.add(o, I64(2)), ssse3), d)


# block_q2_K, 84 bytes:  | scales: uint8[16] | qs: uint8[64] | d: f16 | dmin: f16 |
# weights 128 h + 32 s + l are bits 2s of qs[32 h + l];  w = (d * sc_i) * q - (dmin * m_i)
def _decode_q2_k(builder, raw, table, o, ssse3):
    d = _f16(builder, raw, table, builder.add(o, I64(80)))
    dmin = _f16(builder, raw, table, builder.add(o, I64(82)))
    d8, dmin8 = _splat(builder, d), _splat(builder, dmin)
    for c in range(32):  # weights 8c .. 8c + 7: h = c // 16, s = c // 4 % 4, l = 8 (c % 4) ..
        h, s, l0 = c // 16, c // 4 % 4, 8 * (c % 4)
        if c % 2 == 0:  # sub-block i = c // 2: scales[i] is the low byte of the word at i
            sc = _splat_u32(builder, raw, builder.add(o, I64(c // 2)))
            dl = builder.fmul(d8, builder.sitofp(_field(builder, sc, 0, 0xF), V8F))
            ml = builder.fmul(dmin8, builder.sitofp(_field(builder, sc, 4, 0xF), V8F))
        q = _bits8(builder, raw, builder.add(o, I64(16 + 32 * h + l0)), 2 * s, 3)
        yield _weight8(builder, q, dl, minus=ml)


def _q3_k_scale(builder, raw, o, d8, i):
    """<8 x float> d * (scale_i - 32) for sub-block i of the block_q3_K at raw[o].

    As quant._q3_k_scales: low 4 bits in scales[i % 8] (nibble i // 8), high 2 bits in
    scales[8 + i % 4] (bits 2 (i // 4)); each byte is the top byte of a broadcast word
    that ends at it, so that no read leaves the block.
    """
    low = _splat_u32(builder, raw, builder.add(o, I64(96 + i % 8 - 3)))
    low = _field(builder, low, 24 + 4 * (i // 8), 0xF)
    high = _splat_u32(builder, raw, builder.add(o, I64(104 + i % 4 - 3)))
    high = _field(builder, high, 24 + 2 * (i // 4), 3)
    sc = builder.sub(builder.or_(low, builder.shl(high, _const(high, 4))), _const(low, 32))
    return builder.fmul(d8, builder.sitofp(sc, V8F))


# block_q3_K, 110 bytes:  | hmask: uint8[32] | qs: uint8[64] | scales: uint8[12] | d: f16 |
# weight 128 h + 32 s + l: low 2 bits (qs[32 h + l] >> 2 s) & 3, high bit (hmask[l] >> 4 h + s)
# q = (low | high << 2) - 4 (= low - 4 when the high bit is clear);  w = (d * sc_i) * q
def _decode_q3_k(builder, raw, table, o, ssse3):
    d8 = _splat(builder, _f16(builder, raw, table, builder.add(o, I64(108))))
    for c in range(32):  # weights 8c .. 8c + 7: h = c // 16, s = c // 4 % 4, l = 8 (c % 4) ..
        h, s, l0 = c // 16, c // 4 % 4, 8 * (c % 4)
        if c % 2 == 0:
            dl = _q3_k_scale(builder, raw, o, d8, c // 2)
        low = _bits8(builder, raw, builder.add(o, I64(32 + 32 * h + l0)), 2 * s, 3)
        high = _bits8(builder, raw, builder.add(o, I64(l0)), 4 * h + s, 1)
        q = builder.or_(low, builder.shl(high, _const(high, 2)))
        yield _weight8(builder, builder.sub(q, _const(q, 4)), dl)


def _k4_scales_mins(builder, raw, offset, d, dmin):
    """(<8 x float> d * sc, <8 x float> dmin * m) from the 12 bytes of quant._k4_scales_mins."""
    sc, m = _k4_six_bits(builder, raw, offset)
    return _scales(builder, sc, d), _scales(builder, m, dmin)


def _k4_six_bits(builder, raw, offset):
    """(<8 x i8> sc, <8 x i8> m): the 6-bit scales and mins in the 12 bytes at raw[offset]."""
    b = _vec(builder, raw, offset, 12)
    top = ir.Constant(ir.VectorType(I8, 8), [0] * 4 + [6] * 4)  # sub-blocks 4-7: bits 6-7 on top
    keep = ir.Constant(ir.VectorType(I8, 8), [0x3F] * 4 + [0x0F] * 4)

    def six_bits(low_bytes, low_shift, top_bytes):
        low = _shuffle(builder, b, low_bytes)
        low = builder.and_(builder.lshr(low, ir.Constant(low.type, low_shift)), keep)
        hi = builder.shl(builder.lshr(_shuffle(builder, b, top_bytes), top), _const(low, 4))
        hi = builder.and_(hi, ir.Constant(low.type, [0] * 4 + [0x30] * 4))
        return builder.or_(low, hi)

    sc = six_bits([0, 1, 2, 3, 8, 9, 10, 11], [0] * 8, [0, 1, 2, 3, 0, 1, 2, 3])
    m = six_bits([4, 5, 6, 7, 8, 9, 10, 11], [0] * 4 + [4] * 4, [4, 5, 6, 7, 4, 5, 6, 7])
    return sc, m


# block_q4_K, 144 bytes:  | d: f16 | dmin: f16 | scales: uint8[12] | qs: uint8[128] |
# sub-blocks 2c, 2c + 1 are the low, high nibbles of qs[32 c : 32 c + 32]
# w = (d * sc_i) * q - (dmin * m_i)
def _decode_q4_k(builder, raw, table, o, ssse3):
    d, dmin = _f16(builder, raw, table, o), _f16(builder, raw, table, builder.add(o, I64(2)))
    dl, ml = _k4_scales_mins(builder, raw, builder.add(o, I64(4)), d, dmin)
    for c in range(4):
        qs = _vec(builder, raw, builder.add(o, I64(16 + 32 * c)), 32)
        for nibble in range(2):
            i = 2 * c + nibble
            yield from _weights(builder, _field(builder, qs, 4 * nibble, 0xF),
                                _lane(builder, dl, i), minus=_lane(builder, ml, i))  # fmt: skip


# block_q5_K, 176 bytes:  | d | dmin | scales: uint8[12] | qh: uint8[32] | qs: uint8[128] |
# as q4_K, plus bit 4 of sub-block i, weight l = bit i of qh[l]
def _decode_q5_k(builder, raw, table, o, ssse3):
    d, dmin = _f16(builder, raw, table, o), _f16(builder, raw, table, builder.add(o, I64(2)))
    dl, ml = _k4_scales_mins(builder, raw, builder.add(o, I64(4)), d, dmin)
    qh = _vec(builder, raw, builder.add(o, I64(16)), 32)
    for c in range(4):
        qs = _vec(builder, raw, builder.add(o, I64(48 + 32 * c)), 32)
        for nibble in range(2):
            i = 2 * c + nibble
            q = builder.or_(_field(builder, qs, 4 * nibble, 0xF),
                            builder.shl(_field(builder, qh, i, 1), _const(qh, 4)))  # fmt: skip
            yield from _weights(builder, q, _lane(builder, dl, i), minus=_lane(builder, ml, i))


# block_q6_K, 210 bytes:  | ql: uint8[128] | qh: uint8[64] | scales: int8[16] | d: f16 |
# weight 128 h + 32 s + l: low 4 bits (ql[64 h + 32 (s % 2) + l] >> 4 (s // 2)),
# high 2 bits (qh[32 h + l] >> 2 s);  w = (d * scales_i) * (q - 32)
def _decode_q6_k(builder, raw, table, o, ssse3):
    d8 = _splat(builder, _f16(builder, raw, table, builder.add(o, I64(208))))
    for c in range(32):  # weights 8c .. 8c + 7: h = c // 16, s = c // 4 % 4, l = 8 (c % 4) ..
        h, s, l0 = c // 16, c // 4 % 4, 8 * (c % 4)
        if c % 2 == 0:  # int8 scale i = c // 2 is the top byte of the word at 192 + i - 3
            sc = _splat_u32(builder, raw, builder.add(o, I64(192 + c // 2 - 3)))  # in the block
            dl = builder.fmul(d8, builder.sitofp(builder.ashr(sc, _const(sc, 24)), V8F))
        low = _bits8(
            builder, raw, builder.add(o, I64(64 * h + 32 * (s % 2) + l0)), 4 * (s // 2), 0xF
        )
        high = _bits8(builder, raw, builder.add(o, I64(128 + 32 * h + l0)), 2 * s, 3)
        q = builder.or_(low, builder.shl(high, _const(high, 4)))
        yield _weight8(builder, builder.sub(q, _const(q, 32)), dl)


# block_iq4_xs, 136 bytes:  | d: f16 | scales_h: uint16 | scales_l: uint8[4] | qs: uint8[128] |
# scale i = (nibble i % 2 of scales_l[i // 2] | bits 2i of scales_h << 4) - 32
# w = (d * scale_i) * kvalues[q], sub-block i packed as iq4_nl in qs[16 i : 16 i + 16]
def _decode_iq4_xs(builder, raw, table, o, ssse3):
    d = _f16(builder, raw, table, o)
    b = _vec(builder, raw, builder.add(o, I64(2)), 8)  # scales_h (2 bytes), scales_l (4)
    low = _field(builder, _shuffle(builder, b, [2 + i // 2 for i in range(8)]), [0, 4] * 4, 0xF)
    high = _shuffle(builder, b, [i // 4 for i in range(8)])
    high = _field(builder, high, [2 * (i % 4) for i in range(8)], 3)
    ls = builder.sub(builder.or_(low, builder.shl(high, _const(high, 4))), _const(low, 32))
    dl = _scales(builder, ls, d, signed=True)
    for i in range(8):
        q = _iq4(builder, raw, builder.add(o, I64(8 + 16 * i)), ssse3)
        yield from _weights(builder, q, _lane(builder, dl, i))


def _decode_rows(builder, decode, fmt, raw_p, table_p, offset, row_bytes, n_rows, ssse3):
    """decode(...) of each of a tile's n_rows rows' block (at raw[offset + r row_bytes]),
    each prefetched PREFETCH_BYTES ahead first (both block intrinsics use this)."""
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0",
    )  # fmt: skip
    rows = []
    for r in range(n_rows):
        o = builder.add(offset, builder.mul(row_bytes, I64(r)))
        for line in range(0, fmt.type_size, CACHE_LINE):
            ahead = builder.gep(raw_p, [builder.add(o, I64(PREFETCH_BYTES + line))])
            builder.call(prefetch, [ahead, I32(0), I32(3), I32(1)])  # read, keep, data
        rows.append(decode(builder, raw_p, table_p, o, ssse3))
    return rows


def _block_intrinsic(decode, fmt):
    """The block step for one format, as a Numba intrinsic.

    _block(acc, raw, offset, row_bytes, table, x, x_offset, XK, R, G), R and G literals:
    row r's block starts at raw.flat[offset + r * row_bytes]; its weights are decoded once,
    8 at a time (w_c = weights 8c .. 8c + 7); for token g < G (x_g = x.flat[x_offset + g * XK:]):
        acc[r * G + g] = fma(w_c, x_g[8c : 8c + 8], acc[r * G + g])   for c = 0, 1, ... in order
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
            ssse3 = _has_ssse3(context)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(V8F, [V8F] * 3), "llvm.fma.v8f32"
            )
            # each row's decoder, which emits the block's IR as it is advanced
            rows = _decode_rows(builder, decode, fmt, raw_p, table_p, offset, row_bytes, n_rows,
                                ssse3)  # fmt: skip
            for c, w_rows in enumerate(zip(*rows, strict=True)):  # weights 8c .. 8c + 7, each row
                for g in range(n_tokens):  # one load of x_g's chunk serves the R rows
                    x_g = builder.add(x_offset, builder.mul(K, I64(g)))
                    x_c = _load(builder, x_p, builder.add(x_g, I64(8 * c)), V8F)
                    for r, w in enumerate(w_rows):
                        slot = I64(8 * (r * n_tokens + g))
                        a = _load(builder, acc_p, slot, V8F)
                        _store(builder, builder.call(fma, [w, x_c, a]), acc_p, slot)
            return context.get_dummy_value()

        return types.none(acc, raw, offset, row_bytes, table, x, x_offset, K, R, G), codegen

    return intrinsic(typer)


_block_q8_0 = _block_intrinsic(_decode_q8_0, quant.Q8_0)
_block_q4_0 = _block_intrinsic(_decode_q4_0, quant.Q4_0)
_block_q4_1 = _block_intrinsic(_decode_q4_1, quant.Q4_1)
_block_q5_0 = _block_intrinsic(_decode_q5_0, quant.Q5_0)
_block_q5_1 = _block_intrinsic(_decode_q5_1, quant.Q5_1)
_block_iq4_nl = _block_intrinsic(_decode_iq4_nl, quant.IQ4_NL)
_block_q2_k = _block_intrinsic(_decode_q2_k, quant.Q2_K)
_block_q3_k = _block_intrinsic(_decode_q3_k, quant.Q3_K)
_block_q4_k = _block_intrinsic(_decode_q4_k, quant.Q4_K)
_block_q5_k = _block_intrinsic(_decode_q5_k, quant.Q5_K)
_block_q6_k = _block_intrinsic(_decode_q6_k, quant.Q6_K)
_block_iq4_xs = _block_intrinsic(_decode_iq4_xs, quant.IQ4_XS)


# ---- the kernel around the block step ------------------------------------------------


@njit(inline="always")
def _tile(block, block_bytes, XB, raw, n0, table, x, t0, y, acc, R, G):
    """y[t0 : t0 + G, n0 : n0 + R] for a tile of R rows x G tokens.

    Weight block b of a row is block_bytes at b * block_bytes; its part of a token's row
    of x starts at b * XB (XB = the block's weights for float x; for the int8 kernels of
    matmul_int8.py, x holds quantised activation blocks of XB bytes)."""
    for i in range(R * G):
        for lane in range(8):
            acc[U(i), U(lane)] = np.float32(0)
    row_bytes, XK = U(raw.shape[1]), U(x.shape[1])
    for b in range(raw.shape[1] // block_bytes):
        block(acc, raw, n0 * row_bytes + U(b * block_bytes), row_bytes, table,
              x, U(t0) * XK + U(b * XB), XK, R, G)  # fmt: skip
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
def _row_quad(block, block_bytes, XB, x, raw, table, y, n0, t0, t1, acc):
    """Rows n0 .. n0 + 3 against tokens t0 .. t1 - 1: tiles 1 x 8 (each row), then
    2 x 4, 2 x 2 (each pair of rows), and 4 x 1 for a last single token."""
    t = t0
    while t1 - t >= 8:
        for r in range(4):
            _tile(block, block_bytes, XB, raw, n0 + U(r), table, x, t, y, acc, 1, 8)
        t += 8
    if t1 - t >= 4:
        for r in range(0, 4, 2):
            _tile(block, block_bytes, XB, raw, n0 + U(r), table, x, t, y, acc, 2, 4)
        t += 4
    if t1 - t >= 2:
        for r in range(0, 4, 2):
            _tile(block, block_bytes, XB, raw, n0 + U(r), table, x, t, y, acc, 2, 2)
        t += 2
    if t1 - t == 1:
        _tile(block, block_bytes, XB, raw, n0, table, x, t, y, acc, 4, 1)


@njit(inline="always")
def _last_row(block, block_bytes, XB, x, raw, table, y, n, acc):
    """Row n alone (the last N % 4 rows): tiles 1 x 8, then 1 x 1."""
    T = x.shape[0]
    t0 = 0
    while T - t0 >= 8:
        _tile(block, block_bytes, XB, raw, n, table, x, t0, y, acc, 1, 8)
        t0 += 8
    while t0 < T:
        _tile(block, block_bytes, XB, raw, n, table, x, t0, y, acc, 1, 1)
        t0 += 1


@njit(inline="always")
def _matmul_blocks(block, block_bytes, XB, x, raws, table, ys):
    """ys[i][T, N_i] = x[T, K] @ W_i[N_i, K]^T for every matrix W_i of `raws`, in one parallel
    region over (token block, 4 rows) units: token block 0 with W_0's quads of rows, then
    W_1's ..., then token block 1. A thread's units are consecutive, so it keeps its
    TOKEN_BLOCK rows of x in cache while the rows of W stream past."""
    T = x.shape[0]
    quads = np.empty(len(raws), dtype=np.int64)  # quads of rows of each matrix
    for i in range(len(raws)):
        quads[i] = raws[i].shape[0] // 4
    n_quads = quads.sum()
    for unit in prange(-(-T // TOKEN_BLOCK) * n_quads):
        t0 = unit // n_quads * TOKEN_BLOCK  # tokens t0 .. t1 - 1
        t1 = min(T, t0 + TOKEN_BLOCK)
        i, quad = _locate(quads, unit % n_quads)  # rows 4 quad .. 4 quad + 3 of matrix i
        acc = _stack_empty(8, 8)  # (R * G, 8 lanes): 8 ymm registers
        _row_quad(block, block_bytes, XB, x, raws[i], table, ys[i], quad * U(4), t0, t1, acc)
    acc = _stack_empty(8, 8)
    for i in range(len(raws)):  # the last N % 4 rows of each matrix
        N = raws[i].shape[0]
        for n in range(N - N % 4, N):
            _last_row(block, block_bytes, XB, x, raws[i], table, ys[i], U(n), acc)


# x: float32[T, K] C-contiguous;  raws: a tuple of uint8[N_i, row_bytes];  table: F16_TO_F32;
# ys: a tuple of float32[T, N_i], written (one matrix, or several sharing x, e.g. Wq, Wk, Wv).
# One entry point per format (Numba caches a function by its name); the block sizes are
# quant.py's rows, as literals so that the loops around the block step unroll.


@njit(cache=True, parallel=True)
def matmul_q8_0(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q8_0."""
    _matmul_blocks(_block_q8_0, 34, 32, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q4_0(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q4_0."""
    _matmul_blocks(_block_q4_0, 18, 32, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q4_1(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q4_1."""
    _matmul_blocks(_block_q4_1, 20, 32, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q5_0(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q5_0."""
    _matmul_blocks(_block_q5_0, 22, 32, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q5_1(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q5_1."""
    _matmul_blocks(_block_q5_1, 24, 32, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_iq4_nl(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_iq4_nl."""
    _matmul_blocks(_block_iq4_nl, 18, 32, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q2_k(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q2_K."""
    _matmul_blocks(_block_q2_k, 84, 256, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q3_k(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q3_K."""
    _matmul_blocks(_block_q3_k, 110, 256, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q4_k(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q4_K."""
    _matmul_blocks(_block_q4_k, 144, 256, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q5_k(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q5_K."""
    _matmul_blocks(_block_q5_k, 176, 256, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q6_k(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q6_K."""
    _matmul_blocks(_block_q6_k, 210, 256, x, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_iq4_xs(x, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_iq4_xs."""
    _matmul_blocks(_block_iq4_xs, 136, 256, x, raws, table, ys)
