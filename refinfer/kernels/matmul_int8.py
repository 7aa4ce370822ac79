"""The int8 matmul kernels of numerics="ggml": quantised activations times quantised weights.

y[T, N] = x[T, K] @ W[N, K]^T as llama.cpp computes it (NumPy twin: refinfer/ggml/dot.py).
First `quantize_activations` turns each token's x into 8-bit blocks of the weight
format's activation type (ggml/quantize.py), laid out per block as

    Q8_0 (36 bytes): | d: f32 | qs: int8[32] |
    Q8_1 (40 bytes): | d: f32 | s: f32 | qs: int8[32] |
    Q8_K (292 bytes): | d: f32 | qs: int8[256] | bsums: int16[16] |

(d and s already rounded to f16 where ggml stores f16). Then the kernel of
matmul_blocks.py runs with an integer block step: each weight block is decoded once
into signed int8 codes (with integer sub-block scales), and for each token of the
tile the codes are multiplied by the token's int8 activations in int32 lanes of 4
products (exact), scaled by d * d_a into 8 float32 lanes with one FMA per block.
The reduction order is therefore ggml's on AVX2, and it depends on nothing but K.

The 4-product int32 lanes come from the widest int8 instruction the target has: AVX-512
VNNI's (or AVX-VNNI's) vpdpbusd (u8 x s8, four products into an int32), else AVX2's
vpmaddubsw + vpmaddwd (u8 x s8 -> i16 pairs -> i32 quads), the sign moved onto the
activation with vpsignb in both, so |code| <= 128 and |q| <= 127 never saturate the i16
pairs; else portable LLVM IR (widen, multiply, add). The integers are the same, so the
outputs are too (tests/test_matmul_int8.py compiles all three and compares them).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from refinfer import quant
from refinfer.ggml.dot import REPACK_UNIT, kernel_of
from refinfer.kernels.expf import round_f16
from refinfer.kernels.matmul_blocks import (
    F32,
    I8,
    I16,
    I32,
    I64,
    V8F,
    _const,
    _decode_rows,
    _f16,
    _field,
    _has_ssse3,
    _high_bits,
    _iq4,
    _k4_six_bits,
    _load,
    _matmul_blocks,
    _nibbles,
    _shuffle,
    _splat,
    _store,
    _vec,
)  # fmt: skip

U = np.uint64
V32I8, V16I16, V8I32, V16I32 = (
    ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8), ir.VectorType(I32, 16)
)  # fmt: skip

# activation type -> bytes per block (the layout above)
ACT_BLOCK_BYTES = {"q8_0": 36, "q8_1": 40, "q8_k": 292}
PARALLEL_TOKENS = 16  # fewer tokens: quantise on one thread (as kernels/layer_ops.py)


# ---- activation quantisers: x[T, K] -> blocks (ggml/quantize.py) -------------------------


@njit(inline="always")
def _q8_block(x, t, k0, out_q, q0):
    """Q8_0 / Q8_1 of x[t, k0 : k0 + 32] into out_q[q0 :]: (d unrounded, sum of qs)."""
    amax = np.float32(0)
    for j in range(32):
        amax = max(amax, abs(x[t, k0 + j]))
    d = amax / np.float32(127)
    inv = np.float32(127) / amax if amax != 0 else np.float32(0)
    total = 0
    for j in range(32):
        q = np.int8(np.rint(x[t, k0 + j] * inv))  # halves to even
        out_q[t, q0 + j] = q
        total += q
    return d, total


@njit(inline="always")
def _quantize_token(x, kind, out, t):
    K = x.shape[1]
    out_q, out_f, out_h = out.view(np.int8), out.view(np.float32), out.view(np.int16)
    if kind == 0 or kind == 1:  # q8_0, q8_1
        XB = 36 if kind == 0 else 40
        for b in range(K // 32):
            o = b * XB
            d, total = _q8_block(x, t, b * 32, out_q, o + XB - 32)
            out_f[t, o // 4] = round_f16(d)
            if kind == 1:  # s = f16(d * sum q)
                out_f[t, o // 4 + 1] = round_f16(d * np.float32(total))
        return
    for b in range(K // 256):  # q8_k
        o, k0 = b * 292, b * 256
        top, amax = np.float32(0), np.float32(0)
        for j in range(256):
            if abs(x[t, k0 + j]) > amax:  # the first of equal maxima
                amax, top = abs(x[t, k0 + j]), x[t, k0 + j]
        iscale = np.float32(-127) / top if amax != 0 else np.float32(0)
        out_f[t, o // 4] = np.float32(1) / iscale if amax != 0 else np.float32(0)
        for j in range(0, 256, 16):
            s = 0
            for i in range(j, j + 16):
                q = min(127, int(np.rint(iscale * x[t, k0 + i])))  # the float32 product
                out_q[t, o + 4 + i] = q
                s += q
            out_h[t, (o + 260) // 2 + j // 16] = s


@njit(cache=True)
def _quantize_serial(x, kind, out):
    for t in range(x.shape[0]):
        _quantize_token(x, kind, out, t)


@njit(cache=True, parallel=True)
def _quantize_parallel(x, kind, out):
    for t in prange(x.shape[0]):
        _quantize_token(x, kind, out, t)


_KIND = {"q8_0": 0, "q8_1": 1, "q8_k": 2}


def quantize_activations(x: np.ndarray, act: str) -> np.ndarray:
    """uint8[T, K / QK * block bytes]: x float32[T, K] (C-contiguous) as `act` blocks."""
    qk = 256 if act == "q8_k" else 32
    out = np.empty((x.shape[0], x.shape[1] // qk * ACT_BLOCK_BYTES[act]), np.uint8)
    quantize = _quantize_parallel if len(x) >= PARALLEL_TOKENS else _quantize_serial
    quantize(x, _KIND[act], out)
    return out


# ---- integer dot products of 32 codes with 32 activations --------------------------------


def _intrinsic_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _dot4(builder, codes, qa, isa):
    """<8 x i32>: lane i = sum_{j = 4i .. 4i + 3} codes[j] * qa[j] (two <32 x i8>, exact).

    isa (_int8_isa): "vnni" one vpdpbusd; "avx2" vpmaddubsw + vpmaddwd; "portable" IR."""
    if isa in ("vnni", "avx2"):
        negative = builder.icmp_signed("<", codes, _const(codes, 0))
        magnitude = builder.select(negative, builder.sub(_const(codes, 0), codes), codes)
        signed_qa = builder.call(
            _intrinsic_fn(builder, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8]), [qa, codes]
        )  # qa * sign(code): the product's sign, on the operand that stays signed
        if isa == "vnni":  # u8 x s8, four products added into each int32 lane, no saturation
            dpbusd = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.256", V8I32, [V8I32] * 3)
            zero = ir.Constant(V8I32, [0] * 8)
            as_i32 = [builder.bitcast(v, V8I32) for v in (magnitude, signed_qa)]
            return builder.call(dpbusd, [zero, *as_i32])
        pairs = builder.call(
            _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [V32I8, V32I8]),
            [magnitude, signed_qa],
        )  # <16 x i16>: |c| q' of lanes 2i, 2i + 1 added (at most 2 * 128 * 127: no saturation)
        return builder.call(
            _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16]),
            [pairs, ir.Constant(V16I16, [1] * 16)],
        )
    wide = ir.VectorType(I16, 32)
    products = builder.mul(builder.sext(codes, wide), builder.sext(qa, wide))  # |p| <= 16256
    products = builder.sext(products, ir.VectorType(I32, 32))
    lanes = [_shuffle(builder, products, [4 * i + j for i in range(8)]) for j in range(4)]
    return builder.add(builder.add(lanes[0], lanes[1]), builder.add(lanes[2], lanes[3]))


def _int8_isa(context):
    """The widest int8 dot product the code being compiled may use (Numba's target
    features, which follow the host unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say
    otherwise): "vnni" (AVX-512 VNNI with VL, or AVX-VNNI), "avx2", or "portable"."""
    features = set(context.codegen()._tm_features.split(","))
    if {"+avx512vnni", "+avx512vl"} <= features or "+avxvnni" in features:
        return "vnni"
    return "avx2" if "+avx2" in features else "portable"


# ---- one decoder per weight format: a block as integer codes -----------------------------


class IntBlock(NamedTuple):
    """A weight block as IR values: w = d * scale * code (- dmin * min) (+ m); see ggml/dot.py."""

    d: ir.Value  # float
    chunks: list  # per 32 weights: (codes <32 x i8>, lane scales <8 x i32> or None)
    dmin: ir.Value | None = None  # float: K-quants with mins
    mins: ir.Value | None = None  # <16 x i32>: the min of each 16 weights
    m: ir.Value | None = None  # float: Q4_1 / Q5_1's offset


def _at(builder, o, n):
    return builder.add(o, I64(n))


def _lane_scales(builder, scales, first, second, signed):
    """<8 x i32>: lanes 0-3 = scales[first], lanes 4-7 = scales[second] (widened)."""
    picked = _shuffle(builder, scales, [first] * 4 + [second] * 4)
    return (builder.sext if signed else builder.zext)(picked, V8I32)


def _int_q8_0(builder, raw, table, o, ssse3):
    codes = _vec(builder, raw, _at(builder, o, 2), 32)
    return IntBlock(_f16(builder, raw, table, o), [(codes, None)])


def _int_q4_0(builder, raw, table, o, ssse3):
    q = _nibbles(builder, _vec(builder, raw, _at(builder, o, 2), 16))
    return IntBlock(_f16(builder, raw, table, o), [(builder.sub(q, _const(q, 8)), None)])


def _int_q5_0(builder, raw, table, o, ssse3):
    high = _high_bits(builder, raw, _at(builder, o, 2))
    q = _nibbles(builder, _vec(builder, raw, _at(builder, o, 6), 16))
    q = builder.or_(q, builder.shl(high, _const(high, 4)))
    return IntBlock(_f16(builder, raw, table, o), [(builder.sub(q, _const(q, 16)), None)])


def _int_q4_1(builder, raw, table, o, ssse3):
    q = _nibbles(builder, _vec(builder, raw, _at(builder, o, 4), 16))
    d, m = _f16(builder, raw, table, o), _f16(builder, raw, table, _at(builder, o, 2))
    return IntBlock(d, [(q, None)], m=m)


def _int_q5_1(builder, raw, table, o, ssse3):
    high = _high_bits(builder, raw, _at(builder, o, 4))
    q = _nibbles(builder, _vec(builder, raw, _at(builder, o, 8), 16))
    q = builder.or_(q, builder.shl(high, _const(high, 4)))
    d, m = _f16(builder, raw, table, o), _f16(builder, raw, table, _at(builder, o, 2))
    return IntBlock(d, [(q, None)], m=m)


def _int_iq4_nl(builder, raw, table, o, ssse3):
    codes = _iq4(builder, raw, _at(builder, o, 2), ssse3)
    return IntBlock(_f16(builder, raw, table, o), [(codes, None)])


def _int_q2_k(builder, raw, table, o, ssse3):
    # weight 128 h + 32 s + l = bits 2s of qs[32 h + l]; 32-chunk c = 4 h + s: sub-blocks 2c, 2c+1
    b = _vec(builder, raw, o, 16)
    sc, mins = _field(builder, b, 0, 0xF), _field(builder, b, 4, 0xF)
    chunks = []
    for c in range(8):
        qs = _vec(builder, raw, _at(builder, o, 16 + 32 * (c // 4)), 32)
        chunks.append((_field(builder, qs, 2 * (c % 4), 3),
                       _lane_scales(builder, sc, 2 * c, 2 * c + 1, signed=False)))  # fmt: skip
    return IntBlock(_f16(builder, raw, table, _at(builder, o, 80)), chunks,
                    dmin=_f16(builder, raw, table, _at(builder, o, 82)),
                    mins=builder.zext(mins, V16I32))  # fmt: skip


def _int_q3_k(builder, raw, table, o, ssse3):
    # code = low 2 bits - 4 unless the hmask bit is set; 6-bit scales as quant._q3_k_scales
    b = _vec(builder, raw, _at(builder, o, 96), 12)
    low = _field(builder, _shuffle(builder, b, [i % 8 for i in range(16)]), [0] * 8 + [4] * 8, 0xF)
    high = _field(builder, _shuffle(builder, b, [8 + i % 4 for i in range(16)]),
                  [2 * (i // 4) for i in range(16)], 3)  # fmt: skip
    sc = builder.sub(builder.or_(low, builder.shl(high, _const(high, 4))), _const(low, 32))
    hmask = _vec(builder, raw, o, 32)
    chunks = []
    for c in range(8):
        h, s = c // 4, c % 4
        q = _field(builder, _vec(builder, raw, _at(builder, o, 32 + 32 * h), 32), 2 * s, 3)
        q = builder.or_(q, builder.shl(_field(builder, hmask, 4 * h + s, 1), _const(q, 2)))
        chunks.append((builder.sub(q, _const(q, 4)),
                       _lane_scales(builder, sc, 2 * c, 2 * c + 1, signed=True)))  # fmt: skip
    return IntBlock(_f16(builder, raw, table, _at(builder, o, 108)), chunks)


def _int_q45_k(builder, raw, table, o, qh_offset):
    """Q4_K (qh_offset None) or Q5_K: sub-block c is nibble c % 2 of qs[32 (c // 2) :]
    (and, for Q5_K, bit c of qh above it)."""
    sc, mins = _k4_six_bits(builder, raw, _at(builder, o, 4))
    qs_offset = 16 if qh_offset is None else 48
    chunks = []
    for c in range(8):
        qs = _vec(builder, raw, _at(builder, o, qs_offset + 32 * (c // 2)), 32)
        q = _field(builder, qs, 4 * (c % 2), 0xF)
        if qh_offset is not None:
            qh = _vec(builder, raw, _at(builder, o, qh_offset), 32)
            q = builder.or_(q, builder.shl(_field(builder, qh, c, 1), _const(q, 4)))
        chunks.append((q, _lane_scales(builder, sc, c, c, signed=False)))
    mins16 = builder.zext(_shuffle(builder, mins, [i // 2 for i in range(16)]), V16I32)
    return IntBlock(_f16(builder, raw, table, o), chunks,
                    dmin=_f16(builder, raw, table, _at(builder, o, 2)), mins=mins16)  # fmt: skip


def _int_q4_k(builder, raw, table, o, ssse3):
    return _int_q45_k(builder, raw, table, o, None)


def _int_q5_k(builder, raw, table, o, ssse3):
    return _int_q45_k(builder, raw, table, o, 16)


def _int_q6_k(builder, raw, table, o, ssse3):
    # weight 128 h + 32 s + l: low 4 bits of ql[64 h + 32 (s % 2) + l] >> 4 (s // 2),
    # high 2 of qh[32 h + l] >> 2 s;  code = q - 32;  int8 scales per 16 weights
    sc = _vec(builder, raw, _at(builder, o, 192), 16)
    chunks = []
    for c in range(8):
        h, s = c // 4, c % 4
        ql = _vec(builder, raw, _at(builder, o, 64 * h + 32 * (s % 2)), 32)
        qh = _vec(builder, raw, _at(builder, o, 128 + 32 * h), 32)
        q = builder.or_(_field(builder, ql, 4 * (s // 2), 0xF),
                        builder.shl(_field(builder, qh, 2 * s, 3), _const(ql, 4)))  # fmt: skip
        chunks.append((builder.sub(q, _const(q, 32)),
                       _lane_scales(builder, sc, 2 * c, 2 * c + 1, signed=True)))  # fmt: skip
    return IntBlock(_f16(builder, raw, table, _at(builder, o, 208)), chunks)


def _int_iq4_xs(builder, raw, table, o, ssse3):
    b = _vec(builder, raw, _at(builder, o, 2), 8)  # scales_h (2 bytes), scales_l (4)
    low = _field(builder, _shuffle(builder, b, [2 + i // 2 for i in range(8)]), [0, 4] * 4, 0xF)
    high = _field(builder, _shuffle(builder, b, [i // 4 for i in range(8)]),
                  [2 * (i % 4) for i in range(8)], 3)  # fmt: skip
    ls = builder.sub(builder.or_(low, builder.shl(high, _const(high, 4))), _const(low, 32))
    chunks = [(_iq4(builder, raw, _at(builder, o, 8 + 16 * i), ssse3),
               _lane_scales(builder, ls, i, i, signed=True)) for i in range(8)]  # fmt: skip
    return IntBlock(_f16(builder, raw, table, o), chunks)


# ---- the block step ----------------------------------------------------------------------


def _repacked_step(unit):
    """The step of a repacked gemm kernel (ggml/dot._matmul_repacked) for units of `unit`
    weights: per unit, lane 0 = fma(float(sum), d d_a, lane 0) and, for the K-quants with
    mins, lane 1 = fma(float(mins . bsums), -(dmin d_a), lane 1) (y = lane 0 + lane 1)."""

    def step(builder, a, blk, chunk_lanes, d_a, bsums):
        fma1 = _intrinsic_fn(builder, "llvm.fma.f32", F32, [F32] * 3)
        reduce8 = _intrinsic_fn(builder, "llvm.vector.reduce.add.v8i32", I32, [V8I32])
        dd = builder.fmul(blk.d, d_a)
        per_unit = unit // 32  # chunks of 32 weights per unit
        lane0, lane1 = builder.extract_element(a, I32(0)), builder.extract_element(a, I32(1))
        for u in range(0, len(chunk_lanes), per_unit):
            lanes = chunk_lanes[u]
            for more in chunk_lanes[u + 1 : u + per_unit]:
                lanes = builder.add(lanes, more)
            total = builder.sitofp(builder.call(reduce8, [lanes]), F32)
            lane0 = builder.call(fma1, [total, dd, lane0])
            if blk.mins is not None:  # the unit's 16-weight groups: lanes 16u/32 ...
                first, n = u * 2, per_unit * 2
                per16 = builder.mul(blk.mins, bsums)
                picked = _shuffle(builder, per16, list(range(first, first + n)))
                reduce = _intrinsic_fn(
                    builder, f"llvm.vector.reduce.add.v{n}i32", I32, [picked.type]
                )
                mins = builder.sitofp(builder.call(reduce, [picked]), F32)
                coef = builder.fneg(builder.fmul(blk.dmin, d_a))
                lane1 = builder.call(fma1, [mins, coef, lane1])
        a = builder.insert_element(a, lane0, I32(0))
        return builder.insert_element(a, lane1, I32(1))

    return step


def _tiled_step(builder, a, blk, sumi, d_a, bsums):
    """<8 x float> a after one super-block of llama.cpp's tiled K-quant kernel
    (ggml/dot._matmul_tiled), on lane 0: r = fma(-dmin, float(mins . bsums), float(sum) d);
    lane 0 = fma(r, d_a, lane 0)."""
    fma1 = _intrinsic_fn(builder, "llvm.fma.f32", F32, [F32] * 3)
    reduce8 = _intrinsic_fn(builder, "llvm.vector.reduce.add.v8i32", I32, [V8I32])
    r = builder.fmul(builder.sitofp(builder.call(reduce8, [sumi]), F32), blk.d)
    if blk.mins is not None:
        reduce16 = _intrinsic_fn(builder, "llvm.vector.reduce.add.v16i32", I32, [V16I32])
        mins = builder.sitofp(builder.call(reduce16, [builder.mul(blk.mins, bsums)]), F32)
        r = builder.call(fma1, [builder.fneg(blk.dmin), mins, r])
    lane0 = builder.call(fma1, [r, d_a, builder.extract_element(a, I32(0))])
    return builder.insert_element(a, lane0, I32(0))


def _act_fields(builder, x_p, xo, act, n_chunks):
    """(d_a, s_a or None, [<32 x i8> per chunk], <16 x i32> bsums or None) of a token's block."""
    d_a = _load(builder, x_p, xo, F32)
    s_a = _load(builder, x_p, _at(builder, xo, 4), F32) if act == "q8_1" else None
    q0 = 8 if act == "q8_1" else 4
    qa = [_load(builder, x_p, _at(builder, xo, q0 + 32 * c), V32I8) for c in range(n_chunks)]
    bsums = None
    if act == "q8_k":
        bsums = _load(builder, x_p, _at(builder, xo, 260), ir.VectorType(I16, 16))
        bsums = builder.sext(bsums, V16I32)
    return d_a, s_a, qa, bsums


def _int_block_intrinsic(decode, fmt, act, kernel="vec_dot"):
    """The integer block step of one weight format, with the signature of
    matmul_blocks._block_intrinsic: for each row r and token g of the tile,
        acc[r G + g] = fma(d * d_a, float(sum over chunks of lanes * scales), acc[r G + g])
    then lane 0 takes Q4_1 / Q5_1's offset term (the K-quants never take this kernel). `kernel`
    names llama.cpp's kernel whose arithmetic this follows (ggml/dot.kernel_of): "vec_dot"
    as above; "repacked": the block's lanes summed into one int32 scaled into lane 0, its
    mins into lane 1, negated (y = lane 0 + lane 1); "tiled": one int32 per super-block
    into lane 0 (ggml/dot.py)."""

    def typer(typingctx, acc, raw, offset, row_bytes, table, x, x_offset, XK, R, G):
        if not (isinstance(R, types.IntegerLiteral) and isinstance(G, types.IntegerLiteral)):
            return None
        n_rows, n_tokens = R.literal_value, G.literal_value

        def codegen(context, builder, sig, args):
            acc_p, raw_p, table_p, x_p = (
                make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 1, 4, 5)
            )
            offset, row_bytes, x_offset, XK = args[2], args[3], args[6], args[7]
            ssse3, isa = _has_ssse3(context), _int8_isa(context)
            fma = _intrinsic_fn(builder, "llvm.fma.v8f32", V8F, [V8F] * 3)
            fma1 = _intrinsic_fn(builder, "llvm.fma.f32", F32, [F32] * 3)
            blocks = _decode_rows(builder, decode, fmt, raw_p, table_p, offset, row_bytes,
                                  n_rows, ssse3)  # fmt: skip
            x_p8 = builder.bitcast(x_p, I8.as_pointer())
            for g in range(n_tokens):
                xo = builder.add(x_offset, builder.mul(XK, I64(g)))
                d_a, s_a, qa, bsums = _act_fields(builder, x_p8, xo, act, len(blocks[0].chunks))
                for r, blk in enumerate(blocks):
                    chunk_lanes = []  # per 32 weights: <8 x i32> (scaled)
                    for (codes, scales), q in zip(blk.chunks, qa, strict=True):
                        lanes = _dot4(builder, codes, q, isa)
                        if scales is not None:
                            lanes = builder.mul(lanes, scales)
                        chunk_lanes.append(lanes)
                    sumi = chunk_lanes[0]
                    for lanes in chunk_lanes[1:]:
                        sumi = builder.add(sumi, lanes)
                    slot = I64(8 * (r * n_tokens + g))
                    a = _load(builder, acc_p, slot, V8F)
                    if kernel == "repacked":
                        step = _repacked_step(REPACK_UNIT[fmt.name])
                        a = step(builder, a, blk, chunk_lanes, d_a, bsums)
                        _store(builder, a, acc_p, slot)
                        continue
                    if kernel == "tiled":
                        _store(builder, _tiled_step(builder, a, blk, sumi, d_a, bsums), acc_p, slot)
                        continue
                    dd = _splat(builder, builder.fmul(blk.d, d_a))
                    a = builder.call(fma, [dd, builder.sitofp(sumi, V8F), a])
                    if blk.m is not None:  # lane 0 += m s_a
                        lane0 = builder.call(fma1, [blk.m, s_a, builder.extract_element(a, I32(0))])
                        a = builder.insert_element(a, lane0, I32(0))
                    _store(builder, a, acc_p, slot)
            return context.get_dummy_value()

        return types.none(acc, raw, offset, row_bytes, table, x, x_offset, XK, R, G), codegen

    return intrinsic(typer)


_dot_q8_0 = _int_block_intrinsic(_int_q8_0, quant.Q8_0, "q8_0")
_dot_q5_0 = _int_block_intrinsic(_int_q5_0, quant.Q5_0, "q8_0")
_dot_q4_1 = _int_block_intrinsic(_int_q4_1, quant.Q4_1, "q8_1")
_dot_q5_1 = _int_block_intrinsic(_int_q5_1, quant.Q5_1, "q8_1")


# xq: uint8[T, K / QK * act bytes] from quantize_activations;  raws: a tuple of uint8[N_i,
# row_bytes];  table: F16_TO_F32;  ys: a tuple of float32[T, N_i], written. One entry point per
# weight format (Numba caches a function by its name): weight block bytes, act block bytes.


@njit(cache=True, parallel=True)
def matmul_q8_0(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q8_0, x as Q8_0."""
    _matmul_blocks(_dot_q8_0, 34, 36, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q5_0(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q5_0, x as Q8_0."""
    _matmul_blocks(_dot_q5_0, 22, 36, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q4_1(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q4_1, x as Q8_1."""
    _matmul_blocks(_dot_q4_1, 20, 40, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q5_1(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q5_1, x as Q8_1."""
    _matmul_blocks(_dot_q5_1, 24, 40, xq, raws, table, ys)


# The formats llama.cpp repacks on x86 (ggml.ops.Simd.repacked), with its repacked kernels'
# arithmetic: one int32 per block (ggml/dot.py).
_dot_q4_0_repacked = _int_block_intrinsic(_int_q4_0, quant.Q4_0, "q8_0", "repacked")
_dot_iq4_nl_repacked = _int_block_intrinsic(_int_iq4_nl, quant.IQ4_NL, "q8_0", "repacked")
_dot_q4_k_repacked = _int_block_intrinsic(_int_q4_k, quant.Q4_K, "q8_k", "repacked")
_dot_q2_k_repacked = _int_block_intrinsic(_int_q2_k, quant.Q2_K, "q8_k", "repacked")


@njit(cache=True, parallel=True)
def matmul_q4_0_repacked(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q4_0, x as Q8_0, as llama.cpp's repacked Q4_0x8."""
    _matmul_blocks(_dot_q4_0_repacked, 18, 36, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_iq4_nl_repacked(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_iq4_nl, x as Q8_0, as llama.cpp's repacked IQ4_NLx8."""
    _matmul_blocks(_dot_iq4_nl_repacked, 18, 36, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q4_k_repacked(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q4_K, x as Q8_K, as llama.cpp's repacked Q4_Kx8."""
    _matmul_blocks(_dot_q4_k_repacked, 144, 292, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q2_k_repacked(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q2_K, x as Q8_K, as llama.cpp's repacked Q2_Kx8."""
    _matmul_blocks(_dot_q2_k_repacked, 84, 292, xq, raws, table, ys)


# The K-quants llama.cpp multiplies with its tiled kernel (batches of >= 8 tokens).
_dot_q2_k_tiled = _int_block_intrinsic(_int_q2_k, quant.Q2_K, "q8_k", "tiled")
_dot_q3_k_tiled = _int_block_intrinsic(_int_q3_k, quant.Q3_K, "q8_k", "tiled")
_dot_q5_k_tiled = _int_block_intrinsic(_int_q5_k, quant.Q5_K, "q8_k", "tiled")
_dot_q6_k_tiled = _int_block_intrinsic(_int_q6_k, quant.Q6_K, "q8_k", "tiled")
_dot_iq4_xs_tiled = _int_block_intrinsic(_int_iq4_xs, quant.IQ4_XS, "q8_k", "tiled")


@njit(cache=True, parallel=True)
def matmul_q2_k_tiled(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q2_K, x as Q8_K, as llama.cpp's tiled kernel."""
    _matmul_blocks(_dot_q2_k_tiled, 84, 292, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q3_k_tiled(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q3_K, x as Q8_K, as llama.cpp's tiled kernel."""
    _matmul_blocks(_dot_q3_k_tiled, 110, 292, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q5_k_tiled(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q5_K, x as Q8_K, as llama.cpp's tiled kernel."""
    _matmul_blocks(_dot_q5_k_tiled, 176, 292, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_q6_k_tiled(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_q6_K, x as Q8_K, as llama.cpp's tiled kernel."""
    _matmul_blocks(_dot_q6_k_tiled, 210, 292, xq, raws, table, ys)


@njit(cache=True, parallel=True)
def matmul_iq4_xs_tiled(xq, raws, table, ys):
    """ys[i] = x @ W_i^T for W_i in block_iq4_xs, x as Q8_K, as llama.cpp's tiled kernel."""
    _matmul_blocks(_dot_iq4_xs_tiled, 136, 292, xq, raws, table, ys)


def kernel(name: str, simd):
    """The int8 kernel that computes what llama.cpp's build `simd` does for weights `name`."""
    suffix = {"vec_dot": "", "repacked": "_repacked", "tiled": "_tiled"}[kernel_of(name, simd)]
    return globals()[f"matmul_{name}{suffix}"]
