"""Activation quantisation: the 8-bit blocks llama.cpp turns activations into before a product.

In ggml every weight type has a `vec_dot_type`, the format its activations are
quantised to before the integer dot product (ggml-cpu.c's type_traits_cpu):

    weights Q8_0, Q4_0, Q5_0, IQ4_NL        -> Q8_0: 32-blocks, one f16 scale d
    weights Q4_1, Q5_1                      -> Q8_1: 32-blocks, f16 d and s = d * sum(q)
    weights Q2_K .. Q6_K, IQ4_XS            -> Q8_K: 256-blocks, float32 d, 16 sums of 16

This file states each quantiser in NumPy, as ggml's CPU code computes it on x86
(arch/x86/quants.c: quantize_row_q8_0 / q8_1 with AVX, quantize_row_q8_K =
ggml-quants.c's quantize_row_q8_K_ref). refinfer/kernels/matmul_int8.py computes
the same bits, and dot.py multiplies by them. Note two details that make these
differ from the `_ref` quantisers that write model files: Q8_0 and Q8_1 multiply by
127 / amax (not by 1 / d) and round halves to even (not away from zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK8_0 = 32  # activations per Q8_0 / Q8_1 block
QK_K = 256  # activations per Q8_K block
F32 = np.float32


@dataclass(frozen=True)
class Q8Blocks:
    """Quantised activations of T tokens: x[t, k] ~ d[t, k // QK] * qs[t, k].

    `s` (Q8_1 only): f16(d * sum of the block's qs), as float32; `bsums` (Q8_K only):
    int16[T, K / 16], the sum of each 16 qs.
    """

    qs: np.ndarray  # int8[T, K]
    d: np.ndarray  # float32[T, K / QK]
    s: np.ndarray | None = None  # float32[T, K / 32]
    bsums: np.ndarray | None = None  # int16[T, K / 16]


def _round_f16(v: np.ndarray) -> np.ndarray:
    """float32 -> the nearest float16 (ties to even, as F16C's vcvtps2ph) -> float32."""
    return v.astype(np.float16).astype(F32)


def _q8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(qs int8[T, nb, 32], d float32[T, nb]) of float32 x[T, K], as quantize_row_q8_0 on AVX.

    d = amax / 127;  qs = round_half_even(x * (127 / amax))  (0 where amax = 0)
    """
    T, K = x.shape
    blocks = x.reshape(T, K // QK8_0, QK8_0)
    amax = np.abs(blocks).max(axis=-1)  # (T, nb): a max is exact in any order
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
    qs = np.rint(blocks * inv[..., None]).astype(np.int8)  # rint: halves to even
    return qs, d


def quantize_q8_0(x: np.ndarray) -> Q8Blocks:
    """x float32[T, K] -> Q8_0 blocks; d stored as f16 (returned rounded, as float32)."""
    qs, d = _q8_blocks(np.asarray(x, F32))
    return Q8Blocks(qs.reshape(x.shape), _round_f16(d))


def quantize_q8_1(x: np.ndarray) -> Q8Blocks:
    """x float32[T, K] -> Q8_1 blocks: Q8_0's d and qs, and s = f16(d * sum(qs)).

    s is the unrounded float32 d times the integer sum (exact in float32), then rounded
    to f16: Q4_1 / Q5_1's offset m contributes m * s to a dot product.
    """
    qs, d = _q8_blocks(np.asarray(x, F32))
    s = d * qs.astype(np.int32).sum(axis=-1).astype(F32)
    return Q8Blocks(qs.reshape(x.shape), _round_f16(d), s=_round_f16(s))


def quantize_q8_k(x: np.ndarray) -> Q8Blocks:
    """x float32[T, K] -> Q8_K blocks, as quantize_row_q8_K_ref.

    max = the x of largest |x| (the first one on a tie), iscale = -127 / max;
    qs = min(127, round_half_even(iscale * x));  d = 1 / iscale  (float32, not f16);
    bsums = sums of 16 qs. A block of zeros has d = 0 and qs = 0.
    """
    x = np.asarray(x, F32)
    T, K = x.shape
    blocks = x.reshape(T, K // QK_K, QK_K)
    first = np.abs(blocks).argmax(axis=-1)[..., None]  # argmax: the first of equal maxima
    top = np.take_along_axis(blocks, first, axis=-1)  # (T, nb, 1): signed
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(top != 0, F32(-127) / top, F32(0)).astype(F32)
        d = np.where(top != 0, F32(1) / iscale, F32(0)).astype(F32)
    # ggml's nearest_int rounds the float32 product (ggml-base is built without FMA, so
    # iscale * x + 1.5 2^23 is not fused): ties of the rounded product go to even
    qs = np.minimum(np.rint(iscale * blocks), 127).astype(np.int8)
    bsums = qs.reshape(T, -1, 16).astype(np.int16).sum(axis=-1, dtype=np.int16)
    return Q8Blocks(qs.reshape(T, K), d[..., 0], bsums=bsums)


# vec_dot_type of each weight format (ggml-cpu.c type_traits_cpu); the float formats
# round the activations to their own type instead (F16 -> f16, BF16 -> bf16, F32 as is)
ACTIVATION_TYPE = {
    "q8_0": "q8_0", "q4_0": "q8_0", "q5_0": "q8_0", "iq4_nl": "q8_0",
    "q4_1": "q8_1", "q5_1": "q8_1",
    "q2_k": "q8_k", "q3_k": "q8_k", "q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k",
    "iq4_xs": "q8_k",
}  # fmt: skip

QUANTIZE = {"q8_0": quantize_q8_0, "q8_1": quantize_q8_1, "q8_k": quantize_q8_k}
