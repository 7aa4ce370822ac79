"""ggml's elementwise and row operations in NumPy, bit for bit as its x86 builds (AVX2 + FMA,
or AVX-512: `Simd`).

Where this sits: numerics="ggml" runs the same layer as the exact mode, but each step that
llama.cpp computes its own way is computed here the way it does: the RMSNorm in front of
every matrix product, the RoPE angles, the attention softmax (with ggml's exp), the gated
MLP's activation, and the float16 rounding of K, V, the query and the probabilities.
The Numba kernels that run the model (kernels/layer_ops.py `rms_norm_ggml`, `glu_ggml`;
kernels/expf.py `expf_ggml`; kernels/attention_ggml.py) compute the same bits, and
tests/test_ggml_ops.py holds them to it.

Every function takes and returns float32 arrays and does one float32 operation per step,
as ggml's C code does; the C function each one mirrors is named in its docstring
(ggml/src/ggml-cpu/vec.h, vec.cpp, ops.cpp of llama.cpp as vendored by llama-cpp-python
0.3.36). Three C library functions (expf in the scalar leftovers, tanhf in the GELU
table, cosf / sinf / powf in RoPE) are taken as correctly rounded: float64 NumPy rounded
to float32. glibc's float versions are within about half an ulp, so they can differ in a
rare last bit; each place says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from refinfer.errors import InvalidParameterError, UnsupportedModelError

F32 = np.float32
F64 = np.float64


@dataclass(frozen=True)
class Simd:
    """One of ggml's x86 builds, as far as float32 results depend on it: the float32 lanes of
    its vector loops and of tinyBLAS's accumulators (8 on AVX2, 16 on AVX-512), which fix
    the order of its sums, and its ggml_v_expf (the two builds' polynomials round differently).
    """

    name: str
    lanes: int
    # weight formats llama.cpp repacks into 8-row interleaved blocks on this build
    # (repack.cpp ggml_repack_get_optimal_repack_type; matrices of N % 8 == 0 rows), whose
    # kernels sum each block's products into one int32 before scaling it (ggml/dot.py)
    repacked: frozenset


_REPACKED_AVX2 = frozenset({"q4_0", "q4_k", "iq4_nl"})
SIMD = {
    "avx2": Simd("avx2", 8, _REPACKED_AVX2),
    "avx512": Simd("avx512", 16, _REPACKED_AVX2 | {"q2_k"}),
}
# K-quants llama.cpp multiplies with its tiled kernel when not repacked (tiled.cpp)
TILED = frozenset({"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"})


def host_simd() -> Simd:
    """The build llama.cpp compiles on this CPU with -march=native (llama-cpp-python's
    default): AVX-512 where the CPU has AVX512F and AVX512DQ, else AVX2 (also on non-x86
    CPUs, whose NEON build this does not state). REFINFER_GGML_SIMD=avx2|avx512 chooses
    instead, to reproduce llama.cpp as built on another machine."""
    name = os.environ.get("REFINFER_GGML_SIMD")
    if name is None:
        import llvmlite.binding as ll

        features = ll.get_host_cpu_features()
        name = "avx512" if features.get("avx512f") and features.get("avx512dq") else "avx2"
    if name not in SIMD:
        raise InvalidParameterError(
            f"REFINFER_GGML_SIMD must be one of {', '.join(SIMD)}, not {name!r}"
        )
    return SIMD[name]


HOST = host_simd()
LANES = HOST.lanes  # the default of every function below whose bits depend on it


# ---- float16 rounding and the fused multiply-add ------------------------------------


def round_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 -> float32, round to nearest even (F16C vcvtps2ph, mode 0).

    ggml's GGML_CPU_FP32_TO_FP16 on x86: how K and V enter the cache and how q and the
    softmax probabilities enter their products with them (mul_mat converts src1 to F16).
    """
    with np.errstate(over="ignore"):  # beyond 65504: inf, as F16C
        return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a b + c rounded once to float32 (vfmadd231ps; C's fmaf), elementwise.

    The product of two float32 is exact in float64 (24 + 24 < 53 bits). The float64 sum
    s = fl(p + c) is off by an error e that TwoSum recovers exactly:

        s = p + c,  bb = s - p,  e = (p - (s - bb)) + (c - bb)        (Knuth's TwoSum)

    Rounding s to float32 directly could round twice (p + c -> s -> float32). Instead s is
    made odd-rounded: if e != 0 and s's last bit is 0, s moves one float64 ulp towards
    p + c. Round-to-odd at 53 >= 24 + 2 bits, then round to nearest, is the correctly
    rounded result (Boldo and Melquiond), subnormal float32 results included.
    """
    a, b, c = (np.asarray(v, dtype=F32) for v in (a, b, c))
    with np.errstate(invalid="ignore", over="ignore"):
        p = a.astype(F64) * b.astype(F64)  # exact
        s = p + c.astype(F64)
        bb = s - p
        e = (p - (s - bb)) + (c.astype(F64) - bb)  # p + c = s + e exactly
    bits = np.atleast_1d(s).view(np.int64).copy()
    e = np.broadcast_to(e, bits.shape)
    inexact = np.isfinite(np.atleast_1d(s)) & (e != 0) & (bits & 1 == 0)
    away = (e > 0) == (np.atleast_1d(s) > 0)  # p + c is further from 0 than s
    bits = np.where(inexact, bits + np.where(away, 1, -1), bits)  # to the odd neighbour
    with np.errstate(over="ignore"):  # beyond float32: inf
        return bits.view(F64).astype(F32).reshape(np.shape(s))


# ---- exp, SiLU and GELU ------------------------------------------------------------------

# ggml_v_expf's constants (vec.h, "adapted from arm limited optimized routine")
EXP_SHIFT = F32(float.fromhex("0x1.8p23"))  # 1.5 2^23: z = x log2e + it keeps n in its low bits
EXP_LOG2E = F32(float.fromhex("0x1.715476p+0"))
EXP_LN2_HI = F32(float.fromhex("0x1.62e4p-1"))  # ln 2 = hi + lo
EXP_LN2_LO = F32(float.fromhex("0x1.7f7d1cp-20"))
EXP_C = tuple(F32(float.fromhex(h)) for h in (
    "0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1"
))  # fmt: skip


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F32).view(np.uint32)


def _float(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(F32)


def expf(x: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """e^x as ggml_v_expf computes it (vec.h), per lane: the AVX2 + FMA variant for
    lanes=8, the AVX-512 one (`_expf_avx512`) for lanes=16.

        z = fma(x, log2e, 1.5 2^23);  n = z - 1.5 2^23           n = round(x / ln 2)
        b = fma(-n, ln2_lo, fma(-n, ln2_hi, x))                  b = x - n ln 2
        k = bits((bits(z) << 23) + bits(1.0f))                   k = 2^n  (|n| <= 126)
        u = b b
        j = fma(fma(fma(c0, b, c1), u, fma(c2, b, c3)), u, c4 b)  j = e^b - 1
        e^x = fma(k, j, k)                                       k (1 + j)

    Lanes with |n| > 126 take ggml's special branch (it runs when any lane of the 8 needs
    it, but each lane's result depends only on that lane): 2^n = s1 s2 with
    g = 0x82000000 if n <= 0 else 0, s1 = bits(g + 0x7f000000), s2 = bits(e - g),
    e^x = fma(s2, j, s2) s1; and |n| > 192 gives s1 s1 (0 or +inf). So -inf gives 0,
    +inf gives +inf, NaN gives NaN; x > 88.7 overflows to inf and x < -103.9 flushes to 0.
    ggml states a maximum error of 1.45 + 0.5 ulp for this variant (the AVX-512 one, which
    rounds twice near 1, reaches 2.2 ulp: tests/test_ggml_ops.py).
    """
    x = np.asarray(x, dtype=F32)
    if lanes == 16:
        return _expf_avx512(x)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        z = fma(x, EXP_LOG2E, EXP_SHIFT)
        n = z - EXP_SHIFT
        b = fma(-n, EXP_LN2_LO, fma(-n, EXP_LN2_HI, x))
        e = _bits(z) << np.uint32(23)  # 32-bit wrap-around, as vpslld
        k = _float(e + _bits(F32(1)))
        u = b * b
        c0, c1, c2, c3, c4 = EXP_C
        j = fma(fma(fma(c0, b, c1), u, fma(c2, b, c3)), u, c4 * b)
        g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))
        s1 = _float(g + np.uint32(0x7F000000))
        s2 = _float(e - g)
        big = np.abs(n) > 126  # comparisons with NaN are false (_CMP_GT_OQ)
        huge = np.abs(n) > 192
        y = np.where(big, fma(s2, j, s2) * s1, fma(k, j, k))
        return np.where(huge, s1 * s1, y).astype(F32)


def _expf_avx512(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf's AVX-512 variant: the same n and b, then

        j = fma(fma(fma(c0, b, c1), u, fma(c2, b, c3)), u, fma(c4, b, 1))   j = e^b
        e^x = scalef(j, n) = j 2^n          (one rounding: exact in float64, then to float32)

    and |n| > 192 gives 0 (n <= 0) or +inf."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        z = fma(x, EXP_LOG2E, EXP_SHIFT)
        n = z - EXP_SHIFT
        b = fma(-n, EXP_LN2_LO, fma(-n, EXP_LN2_HI, x))
        u = b * b
        c0, c1, c2, c3, c4 = EXP_C
        j = fma(fma(fma(c0, b, c1), u, fma(c2, b, c3)), u, fma(c4, b, F32(1)))
        scaled = (j.astype(F64) * np.exp2(n.astype(F64))).astype(F32)
        huge = np.abs(n) > 192
        return np.where(huge, np.where(n <= 0, F32(0), F32(np.inf)), scaled).astype(F32)


def libm_expf(x: np.ndarray) -> np.ndarray:
    """expf of the C library, taken as correctly rounded: float64 exp rounded to float32.

    glibc's expf is within 0.502 ulp, so in rare cases its last bit differs from this.
    ggml uses it for the leftover elements of a row (n % 8) in silu and softmax.
    """
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, dtype=F32).astype(F64)).astype(F32)


def silu(x: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """ggml_v_silu per lane: x / (1 + expf(0 - x)), each step in float32."""
    x = np.asarray(x, dtype=F32)
    return x / (F32(1) + expf(F32(0) - x, lanes))


def silu_scalar(x: np.ndarray) -> np.ndarray:
    """ggml_silu_f32: x / (1.0f + expf(-x)) with the C library's expf (the leftover lanes)."""
    x = np.asarray(x, dtype=F32)
    return x / (F32(1) + libm_expf(-x))


def _vector_part(n: int, lanes: int) -> int:
    """The elements of a row of n that ggml's vector loops cover; the rest go one by one."""
    return n - n % lanes


def swiglu(g: np.ndarray, u: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """ggml_vec_swiglu_f32 on rows [..., F]: silu(g) * u.

    The first F - F % lanes elements of a row take ggml_v_silu (ggml's expf); the last
    F % lanes ggml_silu_f32, whose expf is the C library's (here `libm_expf`, correctly
    rounded). Models' F are multiples of 16, so in practice only ggml's expf is used.
    """
    g, u = np.asarray(g, dtype=F32), np.asarray(u, dtype=F32)
    m = _vector_part(g.shape[-1], lanes)
    act = np.concatenate([silu(g[..., :m], lanes), silu_scalar(g[..., m:])], axis=-1)
    return act * u


GELU_COEF_A = F32(0.044715)
SQRT_2_OVER_PI = F32(0.79788456080286535587989211986876)
GELU_LIMIT = F32(10)  # beyond +-10 ggml_vec_geglu_f32 skips its table


def gelu_f32(x: np.ndarray) -> np.ndarray:
    """ggml_gelu_f32: 0.5f x (1 + tanhf(sqrt(2/pi) x (1 + 0.044715 x^2))), float32.

    As GCC compiles it with -mfma (-ffp-contract=fast), 1 + A x x is one fma(A x, x, 1).
    tanhf is taken as correctly rounded (float64 tanh rounded to float32); the result is
    rounded to float16 where ggml uses it (the table), which hides any last-bit doubt.
    """
    x = np.asarray(x, dtype=F32)
    inner = fma(GELU_COEF_A * x, x, F32(1))  # 1 + A x^2
    t = np.tanh((SQRT_2_OVER_PI * x * inner).astype(F64)).astype(F32)
    return F32(0.5) * x * (F32(1) + t)


def gelu_table() -> np.ndarray:
    """float32[65536]: ggml_table_gelu_f16 (ggml-cpu.c), indexed by float16 bits, as float32.

    entry[i] = float16(gelu_f32(the float16 with bits i)), widened to float32. ggml fills
    it once at start-up; GGML_GELU_FP16 is defined in vec.h, so GELU reads it.
    """
    f = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        return round_f16(gelu_f32(f))


def geglu(g: np.ndarray, u: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
    """ggml_vec_geglu_f32 (GGML_GELU_FP16) on rows [..., F]: gelu(g) * u, GELU from a table.

        g <= -10:  0
        g >= 10:   g u
        else:      table[bits(float16(g))] u      (the GELU of g rounded to float16, twice)

    So Gemma's GELU is a float16 value, not a float32 one: relative error up to 2^-11,
    against about 1e-7 in the exact mode. `table`: gelu_table(), computed if not given.
    """
    g, u = np.asarray(g, dtype=F32), np.asarray(u, dtype=F32)
    table = gelu_table() if table is None else table
    index = g.astype(np.float16).view(np.uint16)
    y = table[index] * u
    y = np.where(g >= GELU_LIMIT, g * u, y)
    return np.where(g <= -GELU_LIMIT, F32(0), y).astype(F32)


# ---- RMSNorm --------------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """ggml_compute_forward_rms_norm_f32, with the multiply by the weight fused, on rows [T, D].

        sum   = sum_i double(x_i * x_i)          float32 products, added in double, in order
        mean  = float(sum / D)                   a double division, rounded to float32
        scale = 1.0f / sqrtf(mean + eps)         float32
        y_i   = x_i * scale * w_i                (x_i scale) w_i, float32

    (eps is a float32 op param.) The fused and the unfused ggml graphs give the same bits.
    """
    x, w = np.asarray(x, dtype=F32), np.asarray(w, dtype=F32)
    squares = (x * x).astype(F64)  # (T, D), each product rounded to float32 first
    total = np.add.accumulate(squares, axis=-1)[..., -1:]  # (T, 1): left to right
    mean = (total / x.shape[-1]).astype(F32)
    scale = F32(1) / np.sqrt(mean + F32(eps))
    return x * scale * w


# ---- RoPE ------------------------------------------------------------------------------


def rope_tables(config, freq_factors: np.ndarray | None, layer: int):
    """cos, sin float32[context_length, rope_dim / 2] of layer `layer`, as ggml's rope cache.

    ggml_compute_forward_rope_flt fills a cache per position p with ggml_rope_cache_init:

        theta_scale = powf(freq_base, -2.0f / n_dims)
        theta_0 = (float) p;   theta_{i+1} = theta_i * theta_scale    (float32, repeated)
        theta = freq_scale * (theta_i / ff_i)                         (rope_yarn, ext_factor 0)
        cos_i = cosf(theta) * mscale,   sin_i = sinf(theta) * mscale

    So the angle is a chain of float32 products, not p * base^(-2i/n): its rounding error
    grows with i, as ggml's does. freq_scale = 1.0f / rope.scaling.factor for linear scaling
    (1 otherwise), ff_i the frequency factors (rope_freqs, Phi-3's rope_factors_*), both
    only on layers whose RoPE is scaled (config.layer_rope); mscale = attn_factor (float32).
    powf is taken as correctly rounded (float64, rounded to float32); cosf and sinf are the
    C library's own (_libm), as their last bits decide roundings to f16 downstream.
    YaRN (ext_factor != 0) is not supported here: UnsupportedModelError.

    ggml then rotates with x0 cos - x1 sin and x0 sin + x1 cos (rotate_pairs), which GCC
    contracts with -mfma into fma(x0, cos, -(x1 sin)) and fma(x0, sin, x1 cos): `rope`
    below, kernels.layer_ops.rope_ggml.
    """
    scaling = config.rope_scaling
    if scaling.type not in ("none", "linear", "longrope"):
        raise UnsupportedModelError(
            f"rope scaling {scaling.type!r} is not supported in numerics='ggml' "
            "(none, linear, longrope, rope_freqs)"
        )
    base, scaled = config.layer_rope(layer)
    half = config.rope_dim // 2
    theta_scale = F32(np.power(F64(F32(base)), F64(F32(-2.0) / F32(config.rope_dim))))
    linear = scaled and scaling.type == "linear"
    freq_scale = F32(1) / F32(scaling.factor) if linear else F32(1)
    ff = np.asarray(freq_factors, dtype=F32) if scaled and freq_factors is not None else None
    mscale = F32(scaling.attn_factor)
    theta = np.arange(config.context_length).astype(F32)  # (P,): theta_0 = p
    cos = np.empty((config.context_length, half), dtype=F32)  # (P, rope_dim / 2)
    sin = np.empty_like(cos)
    for i in range(half):
        extrap = theta / ff[i] if ff is not None else theta
        angle = freq_scale * extrap
        cos[:, i] = _libm("cosf", angle) * mscale
        sin[:, i] = _libm("sinf", angle) * mscale
        theta = theta * theta_scale
    return cos, sin


def _libm(name: str, x: np.ndarray) -> np.ndarray:
    """float32 cosf / sinf of float32 x from the C library llama.cpp links (glibc's libm),
    whose results can differ from the correctly rounded ones in the last bit; the
    correctly rounded float64 result where no C library is found."""
    import ctypes
    import ctypes.util

    path = ctypes.util.find_library("m")
    if path is None:
        return getattr(np, name[:-1])(x.astype(F64)).astype(F32)
    fn = getattr(ctypes.CDLL(path), name)
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return np.array([fn(v) for v in x.tolist()], dtype=F32)


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray,
         neox: bool) -> np.ndarray:  # fmt: skip
    """x float32[T, heads, HD] rotated as ggml's rotate_pairs (compiled with -mfma) does:

        y_a = fma(x_a, cos, -(x_b sin)),   y_b = fma(x_a, sin, x_b cos)

    pairs (2i, 2i + 1), or (i, i + rope_dim / 2) if `neox`; cos, sin from rope_tables."""
    x = np.array(x, dtype=F32)
    half = cos.shape[1]
    ia = np.arange(half) * (1 if neox else 2)
    ib = ia + (half if neox else 1)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]  # (T, 1, half)
    a, b = x[..., ia].copy(), x[..., ib].copy()
    x[..., ia] = fma(a, c, -(b * s))
    x[..., ib] = fma(a, s, b * c)
    return x


def kq_scale(head_dim: int) -> np.float32:
    """llama.cpp's kq_scale: 1.0f / sqrtf((float) n_embd_head), in float32.

    (For head_dim 64 it is 0.125 exactly; for 128 it is float32(1 / sqrt(128)) only by luck
    of rounding, so pass this, not the float64 config.attention_scale rounded.)
    """
    return F32(1) / np.sqrt(F32(head_dim))


# ---- softmax ---------------------------------------------------------------------------


def hsum(v: np.ndarray) -> np.ndarray:
    """The sum of the lanes [..., W] (W = 8 or 16) as x86 horizontal adds do it, in float32:
    halving, lane i + lane i + W / 2, until one is left. For 8 lanes

        ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))

    (extractf128 + add, movehl + add, movehdup + add_ss: tinyBLAS's hsum and
    ggml_vec_soft_max_f32's per-group sum on AVX2; _mm512_reduce_add_ps on AVX-512.)
    """
    v = np.asarray(v, dtype=F32)
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., half:] + v[..., :half]
    return v[..., 0]


def _lanes(x: np.ndarray, fill: float, lanes: int) -> np.ndarray:
    """A row [..., n] padded with `fill` to whole groups of lanes: [..., n / lanes, lanes]."""
    pad = -x.shape[-1] % lanes
    x = np.concatenate([x, np.full(x.shape[:-1] + (pad,), fill, dtype=x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (-1, lanes))


def softmax(
    s: np.ndarray, scale: float, mask: np.ndarray | None = None, lanes: int = LANES
) -> np.ndarray:  # fmt: skip
    """ggml_compute_forward_soft_max_f32 with ggml_vec_soft_max_f32, on rows [..., n].

        w = s * scale + mask              (ggml_vec_scale_f32, then += mask: 0 or -inf)
        M = max_j w_j
        e_j = expf(w_j - M)               ggml's expf, `lanes` (8 or 16) at a time
        sum = sum_groups double(hsum(e_group))       groups of `lanes` in order, in double
        p_j = e_j * float(1.0 / sum)      1 / sum in double, rounded to float32 once

    A row's last n % lanes elements take the C library's expf, each added to the double
    sum on its own. mask: float32 [..., n] of 0 and -inf (masked: p = 0), or None.
    """
    w = np.asarray(s, dtype=F32) * F32(scale)
    if mask is not None:
        w = w + np.asarray(mask, dtype=F32)
    top = w.max(axis=-1, keepdims=True)
    m = _vector_part(w.shape[-1], lanes)
    with np.errstate(invalid="ignore"):
        e = np.concatenate([expf(w[..., :m] - top, lanes), libm_expf(w[..., m:] - top)], axis=-1)
    groups = hsum(_lanes(e[..., :m], 0.0, lanes)).astype(F64)  # (..., m / lanes)
    tail = e[..., m:].astype(F64)
    terms = np.concatenate([groups, tail], axis=-1)
    total = np.add.accumulate(terms, axis=-1)[..., -1:] if terms.shape[-1] else 0.0
    return e * (1.0 / total).astype(F32)
