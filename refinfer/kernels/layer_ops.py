"""The small per-token operations of a transformer layer: RMSNorm, RoPE, SwiGLU.

Each is cheap next to the matrix products, but each must keep the project's
determinism contract: a token's result depends only on that token's inputs and
is computed in one fixed order, so it is the same alone or inside any batch.
NumPy's own reductions and its SIMD exp do not promise that (their order and
code path can change with the array's length), so these are plain loops.
Their NumPy twins are in refinfer/reference.py (rms_norm, rope, silu).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def rms_norm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for x float32[T, D].

    The sum of squares is accumulated in float64, left to right.
    """
    T, D = x.shape
    for t in prange(T):
        ss = 0.0
        for i in range(D):
            ss += np.float64(x[t, i]) * np.float64(x[t, i])
        # inv_rms = 1 / sqrt(mean(x^2) + eps)
        inv_rms = np.float32(1.0 / math.sqrt(ss / D + eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv_rms * weight[i]


@njit(cache=True, parallel=True)
def rope(x, positions, cos, sin):
    """Rotate x float32[T, heads, HD] in place by its token's position.

    Pair (x[2i], x[2i+1]) turns by the angle position * freq_i:
        x[2i]   <- x[2i] cos - x[2i+1] sin
        x[2i+1] <- x[2i] sin + x[2i+1] cos
    cos, sin: float32[n_positions, rope_dim / 2] tables; dims past rope_dim stay.
    """
    T, n_heads, _ = x.shape
    half = cos.shape[1]
    for t in prange(T):
        p = positions[t]
        for h in range(n_heads):
            for i in range(half):
                a, b = x[t, h, 2 * i], x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = a * cos[p, i] - b * sin[p, i]
                x[t, h, 2 * i + 1] = a * sin[p, i] + b * cos[p, i]


@njit(cache=True, parallel=True)
def silu_mul(gate, up, out):
    """out = silu(gate) * up, silu(g) = g / (1 + exp(-g)); float32[T, F], exp in float64."""
    T, F = gate.shape
    for t in prange(T):
        for i in range(F):
            g = np.float64(gate[t, i])
            out[t, i] = np.float32(g / (1.0 + math.exp(-g))) * up[t, i]
