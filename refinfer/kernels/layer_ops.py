"""The small per-token operations of a transformer layer: RMSNorm, RoPE, the gated MLP's GLU.

Each is cheap next to the matrix products, but each must keep the project's
determinism contract: a token's result depends only on that token's inputs and
is computed in one fixed order, so it is the same alone or inside any batch.
NumPy's own reductions and its SIMD exp do not promise that (their order and
code path can change with the array's length), so these are plain loops.

Each is a loop over tokens, run on one thread below PARALLEL_TOKENS tokens and in
parallel from there (`_per_token`). In a decode step an op handles one token of a few
hundred values, and starting a parallel region (microseconds) costs more than the work:
in parallel the three took 2.8 ms of a 25 ms SmolLM2 step (61 + 60 + 30 calls), on one
thread 1.1 ms; in a 512-token prefill, one thread cost 10% of its speed.
Their NumPy twins are in refinfer/reference.py (rms_norm, rope, silu, gelu_tanh).
numerics="ggml" adds `rms_norm_ggml` and `glu_ggml` at the end: llama.cpp's arithmetic,
whose NumPy twins are in refinfer/ggml/ops.py (rms_norm, swiglu, geglu).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import njit, prange

from refinfer.kernels.expf import expf, expf_ggml, expf_ggml_avx512, f16_bits, fma_f32

U = np.uint64  # index type: unsigned indices skip Numba's negative-index checks
ONE = np.float32(1)
GELU_2C = np.float32(2 * math.sqrt(2 / math.pi))  # 2 sqrt(2 / pi), float32
GELU_A = np.float32(0.044715)
PARALLEL_TOKENS = 16  # fewer tokens than this: one thread


def _per_token(serial, parallel):
    """The op `serial` (a loop over tokens on one thread) or `parallel` (the same with prange),
    chosen by the number of tokens (the first argument's first axis). Same bits either way."""

    def op(x, *args):
        (parallel if len(x) >= PARALLEL_TOKENS else serial)(x, *args)

    op.__doc__ = serial.__doc__
    return op


@njit(inline="always")
def _rms_norm_token(x, weight, eps, out, t):
    D = x.shape[1]
    ss = 0.0
    for i in range(D):
        ss += np.float64(x[t, i]) * np.float64(x[t, i])
    # inv_rms = 1 / sqrt(mean(x^2) + eps)
    inv_rms = np.float32(1.0 / math.sqrt(ss / D + eps))
    for i in range(D):
        out[t, i] = x[t, i] * inv_rms * weight[i]


@njit(cache=True)
def _rms_norm_serial(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for x float32[T, D].

    The sum of squares is accumulated in float64, left to right.
    """
    for t in range(x.shape[0]):
        _rms_norm_token(x, weight, eps, out, t)


@njit(cache=True, parallel=True)
def _rms_norm_parallel(x, weight, eps, out):
    for t in prange(x.shape[0]):
        _rms_norm_token(x, weight, eps, out, t)


rms_norm = _per_token(_rms_norm_serial, _rms_norm_parallel)


@njit(inline="always")
def _rope_token(x, positions, cos, sin, neox, fused, t):
    n_heads, half = x.shape[1], cos.shape[1]
    step, offset = (1, half) if neox else (2, 1)  # a_i = step * i, b_i = a_i + offset
    p = positions[t]
    for h in range(n_heads):
        for i in range(half):
            ia = step * i
            ib = ia + offset
            a, b = x[t, h, ia], x[t, h, ib]
            c, s = cos[p, i], sin[p, i]
            if fused:  # ggml's rotate_pairs as GCC compiles it with -mfma
                x[t, h, ia] = fma_f32(a, c, -(b * s))
                x[t, h, ib] = fma_f32(a, s, b * c)
            else:
                x[t, h, ia] = a * c - b * s
                x[t, h, ib] = a * s + b * c


@njit(cache=True)
def _rope_serial(x, positions, cos, sin, neox, fused):
    """Rotate x float32[T, heads, HD] in place by its token's position.

    Pair (x[a_i], x[b_i]) turns by the angle position * freq_i:
        x[a_i] <- x[a_i] cos - x[b_i] sin
        x[b_i] <- x[a_i] sin + x[b_i] cos
    with (a_i, b_i) = (2i, 2i + 1), or (i, i + rope_dim / 2) if `neox` (reference.rope_pairs).
    cos, sin: float32[n_positions, rope_dim / 2] tables; dims past rope_dim stay.
    `fused`: the first product of each line is fused with the subtraction / addition into
    one FMA (fma(x_a, cos, -(x_b sin)), fma(x_a, sin, x_b cos)), as llama.cpp's build does
    it (numerics="ggml"; twin: ggml/ops.rope); otherwise every product is rounded.
    """
    for t in range(x.shape[0]):
        _rope_token(x, positions, cos, sin, neox, fused, t)


@njit(cache=True, parallel=True)
def _rope_parallel(x, positions, cos, sin, neox, fused):
    for t in prange(x.shape[0]):
        _rope_token(x, positions, cos, sin, neox, fused, t)


_rope = _per_token(_rope_serial, _rope_parallel)


def rope(x, positions, cos, sin, neox):
    """Rotate x float32[T, heads, HD] in place by its token's position (see _rope_serial)."""
    _rope(x, positions, cos, sin, neox, False)


def rope_ggml(x, positions, cos, sin, neox):
    """rope as llama.cpp computes it: each rotation's first product fused into an FMA."""
    _rope(x, positions, cos, sin, neox, True)


@njit(inline="always")
def _glu_token(gate, up, gelu_tanh, out, t):
    for i in range(gate.shape[1]):
        g = gate[t, U(i)]
        # z = 2u = 2 sqrt(2 / pi) (g + 0.044715 g^3) for GELU, g for SiLU
        z = GELU_2C * (g + GELU_A * g * g * g) if gelu_tanh else g
        out[t, U(i)] = g / (ONE + expf(-z)) * up[t, U(i)]


@njit(cache=True, error_model="numpy")
def _glu_serial(gate, up, gelu_tanh, out):
    """out = act(gate) * up for float32[T, F], in float32; both activations are g sigmoid(z):

    silu(g) = g / (1 + exp(-g))                                            (SwiGLU)
    gelu_tanh(g) = 0.5 g (1 + tanh(u)) = g / (1 + exp(-2u)),  u = sqrt(2 / pi) (g + 0.044715 g^3)
                                                                 (GeGLU, if `gelu_tanh`)
    since 1 + tanh(u) = 2 / (1 + exp(-2u)), which does not cancel where u << 0 as
    1 - 2 / (exp(2u) + 1) would. exp is kernels.expf (float32, inline), and the
    division follows NumPy's error model (no zero check; 1 + exp >= 1), so the loop
    vectorises (ymm vdivps and vroundps in `inspect_asm` on AVX2). tests/test_layer_ops.py
    bounds the error against reference.silu / reference.gelu_tanh in float64.
    """
    for t in range(gate.shape[0]):
        _glu_token(gate, up, gelu_tanh, out, t)


@njit(cache=True, parallel=True, error_model="numpy")
def _glu_parallel(gate, up, gelu_tanh, out):
    for t in prange(gate.shape[0]):
        _glu_token(gate, up, gelu_tanh, out, t)


glu = _per_token(_glu_serial, _glu_parallel)


# ---- numerics="ggml": llama.cpp's RMSNorm and GLU (twins: refinfer/ggml/ops.py) -------

F32 = np.float32
GELU_LIMIT = F32(10)  # beyond +-10 ggml_vec_geglu_f32 skips its table


@njit(inline="always")
def _rms_norm_ggml_token(x, weight, eps, out, t):
    D = x.shape[1]
    total = 0.0
    for i in range(D):  # sum = sum_i double(x_i * x_i), the products in float32
        total += np.float64(x[t, U(i)] * x[t, U(i)])
    mean = F32(total / D)
    scale = ONE / np.sqrt(mean + F32(eps))  # 1.0f / sqrtf(mean + eps)
    for i in range(D):
        out[t, U(i)] = x[t, U(i)] * scale * weight[U(i)]


@njit(cache=True)
def _rms_norm_ggml_serial(x, weight, eps, out):
    """out[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * weight as ggml computes it, x float32[T, D].

    ggml_compute_forward_rms_norm_f32 (+ the fused mul): float32 squares added in double,
    left to right; mean rounded to float32; the scale and the products in float32
    (ggml.ops.rms_norm states it). out may be x.
    """
    for t in range(x.shape[0]):
        _rms_norm_ggml_token(x, weight, eps, out, t)


@njit(cache=True, parallel=True)
def _rms_norm_ggml_parallel(x, weight, eps, out):
    for t in prange(x.shape[0]):
        _rms_norm_ggml_token(x, weight, eps, out, t)


rms_norm_ggml = _per_token(_rms_norm_ggml_serial, _rms_norm_ggml_parallel)


@njit(inline="always")
def _glu_ggml_token(gate, up, gelu, table, lanes, out, t):
    F = gate.shape[1]
    if gelu:  # ggml_vec_geglu_f32, GGML_GELU_FP16: GELU read from a float16 table
        for i in range(F):
            g, u = gate[t, U(i)], up[t, U(i)]
            if g <= -GELU_LIMIT:
                y = F32(0)
            elif g >= GELU_LIMIT:
                y = g * u
            else:
                y = table[U(f16_bits(g))] * u
            out[t, U(i)] = y
        return
    m = F - F % lanes  # ggml's vector part; the rest take the scalar code
    if lanes == 16:  # ggml_v_silu: g / (1 + expf(0 - g)), ggml's expf (a loop that vectorises)
        for i in range(m):
            g = gate[t, U(i)]
            out[t, U(i)] = g / (ONE + expf_ggml_avx512(F32(0) - g)) * up[t, U(i)]
    else:
        for i in range(m):
            g = gate[t, U(i)]
            out[t, U(i)] = g / (ONE + expf_ggml(F32(0) - g)) * up[t, U(i)]
    for i in range(m, F):  # ggml_silu_f32 with the C library's expf (correctly rounded here)
        g = gate[t, U(i)]
        out[t, U(i)] = g / (ONE + F32(math.exp(np.float64(-g)))) * up[t, U(i)]


@njit(cache=True, error_model="numpy")
def _glu_ggml_serial(gate, up, gelu, table, lanes, out):
    """out = act(gate) * up for float32[T, F] as ggml computes it (ggml.ops.swiglu / geglu).

    SiLU (gelu False): ggml_vec_swiglu_f32, silu(g) = g / (1 + expf(0 - g)) with ggml's
    expf (kernels.expf.expf_ggml_lanes) on the first F - F % lanes elements of a row, the
    C library's expf on the last F % lanes (lanes: 8 on AVX2, 16 on AVX-512, ggml.ops.Simd).
    GELU (gelu True): ggml_vec_geglu_f32, 0 for
    g <= -10, g u for g >= 10, else table[float16 bits of g] * u (table: ggml.ops.gelu_table,
    float32[65536]). out may be gate.
    """
    for t in range(gate.shape[0]):
        _glu_ggml_token(gate, up, gelu, table, lanes, out, t)


@njit(cache=True, parallel=True, error_model="numpy")
def _glu_ggml_parallel(gate, up, gelu, table, lanes, out):
    for t in prange(gate.shape[0]):
        _glu_ggml_token(gate, up, gelu, table, lanes, out, t)


@cache
def _gelu_table() -> np.ndarray:
    """ggml's GELU table, float32[65536], built once (about 10 ms) on first use."""
    from refinfer.ggml.ops import gelu_table  # NumPy, not a kernel: imported where needed

    return gelu_table()


def glu_ggml(gate, up, gelu, out, lanes=None):
    """out = act(gate) * up for gate, up float32[T, F], as llama.cpp computes it.

    act is SiLU, or GELU (tanh form, from ggml's float16 table) if `gelu`; see
    _glu_ggml_serial. One thread below PARALLEL_TOKENS tokens; same bits either way.
    """
    from refinfer.ggml.ops import LANES  # the host's build (ggml.ops.host_simd)

    op = _glu_ggml_parallel if len(gate) >= PARALLEL_TOKENS else _glu_ggml_serial
    op(gate, up, gelu, _gelu_table(), LANES if lanes is None else lanes, out)
