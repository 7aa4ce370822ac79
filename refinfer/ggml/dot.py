"""The integer dot products of numerics="ggml": y[T, N] = x[T, K] @ W[N, K]^T as ggml does it.

Where this sits: the NumPy twin of refinfer/kernels/matmul_int8.py. The activations
are first quantised to the weight type's activation type (quantize.py); then each
weight block is read as small signed integers ("codes") with integer sub-block
scales, and multiplied by the activation's int8 values in exact integer arithmetic.
Only the scaling by the float block scales rounds.

Every weight block, of QK = 32 or 256 weights, is

    w[j] = d * sc[j // S] * c[j]  (- dmin * m[j // S])   or   d * c[j] + m   (Q4_1, Q5_1)

with c the codes (int8), sc / m the sub-block scales / mins (small integers; 1 and
absent for the 32-blocks) and d, dmin, m f16 floats. The integer sums are exact; which
float arithmetic scales them is the kernel llama.cpp runs for the format (`kernel_of`):

- "vec_dot" (Q8_0, Q5_0, Q4_1, Q5_1: ggml_vec_dot_<type>_q8_* and llamafile's tinyBLAS_Q0,
  AVX2): 8 int32 lanes of 4-weight groups, lane l taking the groups l, l + 8, ...;
      acc[l] = fma(d * d_a, float(lane[l]), acc[l])           (8 float lanes)
      acc[0] = fma(m, s_a, acc[0])                             (Q4_1 / Q5_1; s_a = f16(d_a sum q))
  block by block, then y = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)).
- "repacked" (Q4_0, Q4_K, IQ4_NL, and Q2_K on AVX-512: ops.Simd.repacked; 8 rows interleaved,
  arch/x86/repack.cpp's gemm): one int32 per unit of 32, 64 (Q4_K) or 128 (Q2_K) weights,
      acc  = fma(float(sum over the unit of sc c q), d * d_a, acc)
      accm = fma(float(sum over the unit of m bsum), dmin * d_a, accm)      y = acc - accm
- "tiled" (the other K-quants, tiled/tiled-kernel.cpp): one int32 per super-block,
      r = fma(-dmin, float(sum m bsum), float(sum sc c q) * d);   acc = fma(r, d_a, acc)

llama.cpp switches kernels by batch: the repacked gemm takes tokens 4 at a time and its
gemv the last T % 4 (one FMA per super-block), and the tiled kernel runs from 8 tokens on
(ggml_vec_dot_* below that), so its own decode and prefill differ in the last bits there.
refinfer gives every token one arithmetic (its determinism contract): that of llama.cpp's
prefill (README, Numerics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refinfer import quant
from refinfer.ggml.ops import HOST, TILED, Simd, fma
from refinfer.ggml.quantize import ACTIVATION_TYPE, QUANTIZE
from refinfer.quant import QTensor, _bits, _f16, _k4_scales_mins, _nibbles, _planes, _q3_k_scales

F32 = np.float32
LANES = 8  # int32 lanes of a block's dot product; lane l takes 4-weight groups l, l + 8, ...


@dataclass(frozen=True)
class WeightCodes:
    """A matrix's blocks as integers: w = d * scales * codes (- dmin * mins) (+ m).

    Shapes for N rows of nb blocks of QK weights (S weights per sub-block):
    """

    codes: np.ndarray  # int8[N, nb, QK]
    d: np.ndarray  # float32[N, nb]
    scales: np.ndarray | None = None  # int32[N, nb, QK / 4]: each 4-weight group's scale
    dmin: np.ndarray | None = None  # float32[N, nb]   (Q2_K, Q4_K, Q5_K)
    mins: np.ndarray | None = None  # int32[N, nb, QK / 16]: each 16 weights' min
    m: np.ndarray | None = None  # float32[N, nb]   (Q4_1, Q5_1)


def _groups(v: np.ndarray, weights_per_value: int) -> np.ndarray:
    """int[n, S] per-sub-block values -> int32[n, QK / 4]: one per group of 4 weights."""
    return np.repeat(v.astype(np.int32), weights_per_value // 4, axis=-1)


def _sixteens(v: np.ndarray, weights_per_value: int) -> np.ndarray:
    """int[n, S] per-sub-block values -> int32[n, 16]: one per 16 weights of the block."""
    return np.repeat(v.astype(np.int32), weights_per_value // 16, axis=-1)


# ---- each format's codes (the same fields as quant._dequantize_<fmt>) ---------------------


def _codes_32(b: np.ndarray, name: str) -> dict:
    """The 32-weight formats: one scale d (and Q4_1 / Q5_1's offset m)."""
    if name == "q8_0":
        return {"codes": b[:, 2:34].view(np.int8), "d": _f16(b[:, 0:2])}
    if name in ("q4_0", "iq4_nl"):
        q = _nibbles(b[:, 2:18])
        codes = quant.KVALUES_IQ4NL[q] if name == "iq4_nl" else q.astype(np.int8) - 8
        return {"codes": codes, "d": _f16(b[:, 0:2])}
    if name == "q5_0":
        q = _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6]) << 4)
        return {"codes": q.astype(np.int8) - 16, "d": _f16(b[:, 0:2])}
    if name == "q4_1":
        return {"codes": _nibbles(b[:, 4:20]).astype(np.int8), "d": _f16(b[:, 0:2]),
                "m": _f16(b[:, 2:4])}  # fmt: skip
    # q5_1
    q = _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8]) << 4)
    return {"codes": q.astype(np.int8), "d": _f16(b[:, 0:2]), "m": _f16(b[:, 2:4])}


def _codes_k(b: np.ndarray, name: str) -> dict:
    """The 256-weight super-blocks: integer sub-block scales (and mins) under d (and dmin)."""
    if name == "q2_k":
        sc, mn = b[:, 0:16] & 0xF, b[:, 0:16] >> 4
        q = _planes(b[:, 16:80].reshape(-1, 32), 2).reshape(-1, 256)
        return {"codes": q.astype(np.int8), "d": _f16(b[:, 80:82]), "scales": _groups(sc, 16),
                "dmin": _f16(b[:, 82:84]), "mins": _sixteens(mn, 16)}  # fmt: skip
    if name == "q3_k":
        low = _planes(b[:, 32:96].reshape(-1, 32), 2).reshape(-1, 256)
        high = _planes(b[:, 0:32], 1).reshape(-1, 256)
        q = low.astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)
        scales = _groups(_q3_k_scales(b[:, 96:108]), 16)
        return {"codes": q, "d": _f16(b[:, 108:110]), "scales": scales}
    if name in ("q4_k", "q5_k"):
        sc, mn = _k4_scales_mins(b[:, 4:16])
        if name == "q4_k":
            q = _planes(b[:, 16:144].reshape(-1, 32), 4).reshape(-1, 256)
        else:
            q = _planes(b[:, 48:176].reshape(-1, 32), 4).reshape(-1, 256)
            q = q | (_planes(b[:, 16:48], 1).reshape(-1, 256) << 4)
        return {"codes": q.astype(np.int8), "d": _f16(b[:, 0:2]), "scales": _groups(sc, 32),
                "dmin": _f16(b[:, 2:4]), "mins": _sixteens(mn, 32)}  # fmt: skip
    if name == "q6_k":
        low = _planes(b[:, 0:128].reshape(-1, 64), 4).reshape(-1, 256)
        high = _planes(b[:, 128:192].reshape(-1, 32), 2).reshape(-1, 256)
        q = (low | (high << 4)).astype(np.int8) - 32
        return {"codes": q, "d": _f16(b[:, 208:210]),
                "scales": _groups(b[:, 192:208].view(np.int8), 16)}  # fmt: skip
    # iq4_xs
    high = _planes(b[:, 2:4], 2).transpose(0, 2, 1).reshape(-1, 8)
    low = np.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], axis=-1).reshape(-1, 8)
    ls = (low | (high << 4)).astype(np.int8) - 32
    q = _nibbles(b[:, 8:136].reshape(-1, 16)).reshape(-1, 256)
    return {"codes": quant.KVALUES_IQ4NL[q], "d": _f16(b[:, 0:2]), "scales": _groups(ls, 32)}


def weight_codes(w: QTensor) -> WeightCodes:
    """The integer form of a block-quantised matrix W[N, K]."""
    fmt = w.format
    n, k = w.shape
    b = np.ascontiguousarray(w.data, dtype=np.uint8).reshape(-1, fmt.type_size)
    fields = (_codes_32 if fmt.block_size == 32 else _codes_k)(b, fmt.name)
    nb = k // fmt.block_size

    def rows(v):  # (n * nb, ...) -> (n, nb, ...); scalars per block lose their last axis
        v = np.asarray(v)
        return v.reshape(n, nb, -1)[..., 0] if v.shape[-1] == 1 else v.reshape(n, nb, -1)

    return WeightCodes(**{name: rows(v) for name, v in fields.items()})


def round_activations(x: np.ndarray, fmt: quant.Format) -> np.ndarray:
    """x as a float-format weight's vec_dot_type holds it: F16 -> f16, BF16 -> bf16, F32 as is."""
    x = np.asarray(x, F32)
    if fmt is quant.F16:
        return x.astype(np.float16).astype(F32)
    if fmt is quant.BF16:  # round to nearest even on the top 16 bits (ggml's fp32_to_bf16)
        bits = x.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
        return (rounded & np.uint32(0xFFFF0000)).view(F32)
    return x


def _lanes(q: np.ndarray, c: WeightCodes, b: int) -> np.ndarray:
    """int64[T, N, 8]: the lanes of block b's integer dot product (module doc)."""
    prod = q[:, None, :].astype(np.int64) * c.codes[None, :, b, :]  # (T, N, QK)
    groups = prod.reshape(*prod.shape[:2], -1, 4).sum(axis=-1)  # (T, N, QK / 4)
    if c.scales is not None:
        groups = groups * c.scales[None, :, b, :]
    return groups.reshape(*groups.shape[:2], -1, LANES).sum(axis=-2)


def kernel_of(name: str, simd: Simd = HOST) -> str:
    """Which of llama.cpp's kernels multiplies weights of format `name` on `simd`'s build:
    "repacked", "tiled" (K-quants, batches of 8 tokens or more) or "vec_dot"."""
    if name in simd.repacked:
        return "repacked"
    return "tiled" if name in TILED else "vec_dot"


def matmul(x: np.ndarray, w: QTensor, simd: Simd = HOST) -> np.ndarray:
    """y float32[T, N] = x[T, K] @ W^T in ggml's arithmetic, for a block-quantised W, with
    the kernel llama.cpp's build `simd` (default: this host's) runs for W's format."""
    x = np.asarray(x, F32)
    qk = w.format.block_size
    a = QUANTIZE[ACTIVATION_TYPE[w.format.name]](x)
    c = weight_codes(w)
    T, N = x.shape[0], w.shape[0]
    kernel = kernel_of(w.format.name, simd)
    if kernel == "repacked":
        return _matmul_repacked(a, c, T, N, qk, REPACK_UNIT[w.format.name])
    if kernel == "tiled":
        return _matmul_tiled(a, c, T, N)
    acc = np.zeros((T, N, LANES), F32)
    for b in range(w.shape[1] // qk):
        q = a.qs[:, b * qk : (b + 1) * qk]
        dd = c.d[None, :, b] * a.d[:, b, None]  # (T, N): d * d_a
        acc = fma(dd[..., None], _lanes(q, c, b).astype(F32), acc)
        if c.m is not None:  # + m s_a
            m = np.broadcast_to(c.m[None, :, b], (T, N))
            acc[..., 0] = fma(m, a.s[:, b, None], acc[..., 0])
    return ((acc[..., 0] + acc[..., 4]) + (acc[..., 2] + acc[..., 6])) + (
        (acc[..., 1] + acc[..., 5]) + (acc[..., 3] + acc[..., 7])
    )


# weights per FMA in llama.cpp's repacked gemm kernels (its `sb` loops; arch/x86/repack.cpp)
REPACK_UNIT = {"q4_0": 32, "iq4_nl": 32, "q4_k": 64, "q2_k": 128}


def _matmul_repacked(a, c: WeightCodes, T: int, N: int, qk: int, unit: int) -> np.ndarray:
    """The repacked gemm kernels' arithmetic (module doc), one FMA per `unit` weights:

    acc  = fma(float(sum over the unit of sc c q), d * d_a, acc)
    accm = fma(float(sum over the unit of m bsum), dmin * d_a, accm)     y = acc - accm
    """
    acc = np.zeros((T, N), F32)
    accm = np.zeros((T, N), F32)
    for b in range(c.codes.shape[1]):
        q = a.qs[:, b * qk : (b + 1) * qk]
        prod = q[:, None, :].astype(np.int64) * c.codes[None, :, b, :]  # (T, N, QK)
        groups = prod.reshape(T, N, -1, 4).sum(axis=-1)  # (T, N, QK / 4)
        if c.scales is not None:
            groups = groups * c.scales[None, :, b, :]
        totals = groups.reshape(T, N, -1, unit // 4).sum(axis=-1)  # (T, N, QK / unit)
        dd = c.d[None, :, b] * a.d[:, b, None]
        if c.mins is not None:
            bsums = a.bsums[:, b * 16 : (b + 1) * 16].astype(np.int64)  # (T, 16)
            mins = (c.mins[None, :, b, :] * bsums[:, None, :]).reshape(T, N, -1, unit // 16)
            mins = mins.sum(axis=-1)  # (T, N, QK / unit)
        for u in range(totals.shape[-1]):
            acc = fma(totals[..., u].astype(F32), dd, acc)
            if c.mins is not None:
                accm = fma(mins[..., u].astype(F32), c.dmin[None, :, b] * a.d[:, b, None], accm)
    return acc - accm if c.mins is not None else acc


def _matmul_tiled(a, c: WeightCodes, T: int, N: int) -> np.ndarray:
    """The tiled K-quant kernel's arithmetic, super-block by super-block (tiled-kernel.cpp):

        r   = float(sum_s sc_s sum_{j in s} c_j q_j) * d          (one int32 per block)
        r   = fma(-dmin, float(sum_s m_s bsum_s), r)                (formats with mins)
        acc = fma(r, d_a, acc)

    (The AVX-512 VNNI kernel writes acc + r * d_a with intrinsics, but GCC contracts that
    multiply and add into an FMA too, as -ffp-contract=fast allows: measured bit for bit.)
    """
    acc = np.zeros((T, N), F32)
    for b in range(c.codes.shape[1]):
        q = a.qs[:, b * 256 : (b + 1) * 256]
        total = _lanes(q, c, b).sum(axis=-1).astype(F32)  # (T, N)
        r = total * c.d[None, :, b]
        if c.mins is not None:
            bsums = a.bsums[:, b * 16 : (b + 1) * 16].astype(np.int64)
            mins = (c.mins[None, :, b, :] * bsums[:, None, :]).sum(axis=-1).astype(F32)
            r = fma(np.broadcast_to(-c.dmin[None, :, b], (T, N)), mins, r)
        acc = fma(r, a.d[:, b, None], acc)
    return acc
