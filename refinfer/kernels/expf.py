"""A float32 exp that LLVM vectorises and that gives the same bits on every CPU.

Why not libm: `np.exp` / `math.exp` in a Numba loop is a call to the C library's
scalar expf per element, so the loop around it stays scalar, and the C library
is free to change its last bit between versions and CPUs. `expf` below is made
only of IEEE float32 multiplies and adds (no fastmath, so never fused into an
FMA), a floor, a float -> int conversion of an integral value and an int ->
float bit cast: operations with one correctly rounded result each, so every
x86-64 or ARM CPU gives the same bits, and all of them vectorise: on AVX2,
`inspect_asm` of a loop calling it (`_exp_loop`'s body, uncached) shows 8 lanes
a ymm register, the floor as vroundps, the polynomial as vmulps/vaddps, 2^n as
vcvttps2dq, vpaddd, vpslld; no call. (glu and the attention kernel call it.)

The method is Cephes' expf (S. Moshier), step by step:

    n = floor(x log2(e) + 1/2)               the nearest integer to x / ln 2
    r = (x - n C1) - n C2                    C1 + C2 = ln 2 (Cody-Waite: n C1 is exact)
    e^r = 1 + r + r^2 P(r)                   |r| <= ln(2) / 2 (about), P of degree 5
    e^x = e^r 2^n1 2^n2,   n1 = floor(n / 2), n2 = n - n1

2^n is built from its bits, (n + 127) << 23, in two halves so that each half
is a normal float32 for every n in [-150, 128]: the first product is exact, the
second rounds once, into the subnormal range or to the overflow threshold.
The ends: x > HI (the largest float32 whose exp is finite) gives +inf, x < LO
(below it exp rounds to 0) gives 0, NaN gives NaN; exp(0) = 1 exactly.

Accuracy, measured over every float32 in [LO, HI] (2.24e9 values) against
float64 exp rounded to float32: at most 1 ulp away, subnormal results included,
and 99.2% equal to it (tests/test_expf.py checks every 613th value).

The NumPy twin, `expf_numpy`, does the same operations on float32 arrays and
gives the same bits (the test holds the two together over every float32).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from refinfer.ggml.ops import EXP_C, EXP_LN2_HI, EXP_LN2_LO, EXP_LOG2E, EXP_SHIFT

F = np.float32
LOG2E = F(1.44269504088896341)  # log2(e)
C1 = F(0.693359375)  # ln 2 = C1 + C2; C1 = 355/512 has 9 bits, so n C1 is exact for |n| < 2^15
C2 = F(-2.12194440e-4)
P = tuple(
    F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                   1.6666665459e-1, 5.0000001201e-1)
)  # fmt: skip
HI = F(88.72283172607421875)  # the largest float32 x with a finite exp(x)
LO = F(-103.97208404541015625)  # below it exp(x) < 2^-150, which rounds to 0
HALF, ONE = F(0.5), F(1)


# ---- 2^n from its bits ------------------------------------------------------------


@intrinsic
def _exp2i(typingctx, n):
    """2^n as float32, for a float32 n holding an integer in [-126, 127]: bits (n + 127) << 23."""
    if n != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(builder.fptosi(args[0], i32), i32(127)), i32(23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.float32), codegen


# ---- the function and its NumPy twin ----------------------------------------------


@njit(inline="always")
def expf(x):
    """e^x for a float32 x, within 1 ulp (see the module docstring); inline, so loops vectorise."""
    xc = x if x < HI else HI  # clamped into [LO, HI] (NaN -> HI), so 2^n has its range
    xc = xc if xc > LO else LO
    n = np.floor(xc * LOG2E + HALF)  # the nearest integer to x / ln 2
    r = xc - n * C1  # r = x - n ln 2 in two steps (Cody-Waite)
    r = r - n * C2
    # e^r = 1 + r + r^2 P(r), P by Horner
    p = P[0] * r + P[1]
    p = p * r + P[2]
    p = p * r + P[3]
    p = p * r + P[4]
    p = p * r + P[5]
    y = p * (r * r) + r + ONE
    n1 = np.floor(n * HALF)  # e^x = e^r 2^n1 2^(n - n1), each factor normal
    y = y * _exp2i(n1) * _exp2i(n - n1)
    y = y if x >= LO else F(0)
    y = y if x <= HI else F(np.inf)
    return y if x == x else x  # NaN stays NaN


def expf_numpy(x: np.ndarray) -> np.ndarray:
    """The NumPy twin of `expf`: the same float32 operations, elementwise; same bits."""
    x = np.asarray(x, dtype=np.float32)
    xc = np.where(x < HI, x, HI)
    xc = np.where(xc > LO, xc, LO)
    n = np.floor(xc * LOG2E + HALF)
    r = xc - n * C1
    r = r - n * C2
    p = P[0] * r + P[1]
    for c in P[2:]:
        p = p * r + c
    y = p * (r * r) + r + ONE
    n1 = np.floor(n * HALF)
    y = y * _exp2i_numpy(n1) * _exp2i_numpy(n - n1)
    y = np.where(x >= LO, y, F(0))
    y = np.where(x <= HI, y, F(np.inf))
    return np.where(x == x, y, x).astype(np.float32)


def _exp2i_numpy(n: np.ndarray) -> np.ndarray:
    """2^n from its bits, for float32 n holding integers in [-126, 127]."""
    return ((n.astype(np.int32) + 127) << 23).view(np.float32)


@njit(cache=True)
def _exp_loop(x, out):
    """out[i] = expf(x[i]) for float32[N]: the vectorised loop the tests check, and a kernel."""
    for i in range(x.shape[0]):
        out[i] = expf(x[i])


# ---- numerics="ggml": ggml's own expf, lane by lane -----------------------------------
#
# refinfer/ggml/ops.py states it in NumPy (`expf`, with the equations and the constants,
# imported from there); what follows computes the same bits in Numba, one lane at a time.


@intrinsic
def fma_f32(typingctx, a, b, c):
    """a b + c for float32, rounded once (llvm.fma.f32: vfmadd on an FMA CPU, else fmaf)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic(
            "llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32])
        )
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The 32 bits of a float32, as a non-negative int64 (0 .. 2^32 - 1)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.zext(bits, ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def bits_f32(typingctx, i):
    """The float32 whose bits are the low 32 bits of an int64 (the rest is dropped: wraps)."""
    if i != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(types.int64), codegen


@njit(inline="always")
def round_f16(x):
    """float32(float16(x)): x rounded to the nearest float16, ties to even, overflow to inf
    (ggml's K/V, q and p), in integer arithmetic: LLVM's half conversion needs F16C on x86
    (else a runtime call Numba's JIT does not link), and this must run on any CPU.

    Below 2^-14 float16 is subnormal, a fixed quantum of 2^-24: rint(x 2^24) 2^-24 is exact.
    Above, keep 10 of the 23 mantissa bits, rounding the other 13 to even.
    """
    a = abs(x)
    if not a < F(65520.0):  # rounds to inf (or is inf / nan)
        return x * F(np.inf) if a == a else x
    if a < F(2.0**-14):
        return F(np.rint(x * F(2.0**24)) * F(2.0**-24))
    bits = f32_bits(x)
    keep = (bits >> 13) & 1  # the last kept bit: ties go to even
    return bits_f32((bits + 0x0FFF + keep) & 0xFFFFE000)


@njit(inline="always")
def f16_bits(x):
    """The bits of float16(x) for a float32 x, round to nearest even (F16C's vcvtps2ph), as
    an int64 (0 .. 65535): sign, 5 exponent bits, 10 mantissa bits of round_f16(x)."""
    r = round_f16(x)
    bits = f32_bits(r)
    sign = (bits >> 16) & 0x8000
    a = abs(r)
    if a != a:
        return sign | 0x7E00
    if a == F(np.inf):
        return sign | 0x7C00
    if a < F(2.0**-14):  # subnormal (or zero): the count of 2^-24 quanta
        return sign | np.int64(a * F(2.0**24))
    return sign | ((((bits >> 23) & 0xFF) - 112) << 10) | ((bits >> 13) & 0x3FF)


M32 = 0xFFFFFFFF  # 32-bit wrap-around of the integer lane operations
GG_ONE_BITS = 0x3F800000  # bits of 1.0f
GG_BIAS_BITS = 0x7F000000  # s1 = bits(g + this)
GG_NEG_BITS = 0x82000000  # g for n <= 0
F126, F192 = F(126), F(192)


@njit(inline="always")
def expf_ggml(x):
    """ggml_v_expf (vec.h, AVX2 + FMA) of one float32 lane; the same bits as ops.expf."""
    z = fma_f32(x, EXP_LOG2E, EXP_SHIFT)  # z = x log2(e) + 1.5 2^23, n in its low bits
    n = z - EXP_SHIFT
    b = fma_f32(-n, EXP_LN2_LO, fma_f32(-n, EXP_LN2_HI, x))  # b = x - n ln2 (hi, lo)
    e = (f32_bits(z) << 23) & M32
    k = bits_f32((e + GG_ONE_BITS) & M32)  # 2^n
    u = b * b
    j = fma_f32(
        fma_f32(fma_f32(EXP_C[0], b, EXP_C[1]), u, fma_f32(EXP_C[2], b, EXP_C[3])), u, EXP_C[4] * b
    )  # j = e^b - 1
    an = abs(n)
    if an > F192:  # far out of range: 0 or inf
        s1 = bits_f32(((GG_NEG_BITS if n <= F(0) else 0) + GG_BIAS_BITS) & M32)
        return s1 * s1
    if an > F126:  # 2^n split into two factors
        g = GG_NEG_BITS if n <= F(0) else 0
        s1 = bits_f32((g + GG_BIAS_BITS) & M32)
        s2 = bits_f32((e - g) & M32)
        return fma_f32(s2, j, s2) * s1
    return fma_f32(k, j, k)  # k (1 + j)


@njit(inline="always")
def expf_ggml_avx512(x):
    """ggml_v_expf's AVX-512 variant of one float32 lane; the same bits as ops._expf_avx512.

    scalef(j, n) = j 2^n is two exact-or-once-rounded products by powers of two built from
    their bits, 2^(n >> 1) then 2^(n - (n >> 1)) (each within [-96, 96]): no branch and no
    call, so loops over it vectorise; the selects pick 0 / inf beyond |n| > 192, and NaN.
    """
    z = fma_f32(x, EXP_LOG2E, EXP_SHIFT)
    n = z - EXP_SHIFT
    b = fma_f32(-n, EXP_LN2_LO, fma_f32(-n, EXP_LN2_HI, x))
    u = b * b
    j = fma_f32(
        fma_f32(fma_f32(EXP_C[0], b, EXP_C[1]), u, fma_f32(EXP_C[2], b, EXP_C[3])), u,
        fma_f32(EXP_C[4], b, F(1)),
    )  # fmt: skip  # j = e^b
    k = np.int64(max(min(n, F192), -F192))  # clamped: the selects below cover the rest
    half = k >> 1
    y = j * bits_f32((half + 127) << 23) * bits_f32((k - half + 127) << 23)
    y = (F(0) if n <= F(0) else F(np.inf)) if abs(n) > F192 else y
    return y if x == x else x


@njit(inline="always")
def expf_ggml_lanes(x, lanes):
    """ggml's expf as its build of `lanes` float32 lanes computes it (8: AVX2, 16: AVX-512)."""
    return expf_ggml_avx512(x) if lanes == 16 else expf_ggml(x)
