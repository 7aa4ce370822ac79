"""kernels.layer_ops: glu against its NumPy twins, reference.silu and reference.gelu_tanh (float64),
and each op bitwise the same on one thread and in parallel.

The kernel computes act(g) = g / (1 + expf(-z)) in float32 (z = g for SiLU, z = 2u for
GELU's tanh form). Its error bound, relative to |act(g) up|, from the roundings it does:
expf (1 ulp) and its argument z (GELU: 4 roundings, each moving exp(-z) by a factor
exp(|z| u)), 1 + e, the division and the product with up: (8 + 5 |z|) u in all, u = 2^-24.
The float64 reference's GELU, 0.5 g (1 + tanh(u)), cancels where u << 0 (1 + tanh(u) is
exp(2u) there, known to 2^-52 absolutely): that adds |g up| 2^-52 of its own. Subnormal
results are rounded absolutely, to 2^-150 (times |up| for act before the product).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refinfer import reference
from refinfer.kernels import layer_ops
from refinfer.kernels.layer_ops import glu

U32 = 2.0**-24
F32 = np.float32


def run(gate: np.ndarray, up: np.ndarray, gelu: bool) -> np.ndarray:
    out = np.full_like(gate, np.nan)
    glu(gate, up, gelu, out)
    return out


def z_of(g: np.ndarray, gelu: bool) -> np.ndarray:
    """The sigmoid's argument in float64: 2u for GELU, g for SiLU."""
    return 2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g**3) if gelu else g


finite = st.floats(-60, 60, width=32)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda t: st.tuples(
            arrays(F32, (t, 37), elements=finite), arrays(F32, (t, 37), elements=finite)
        )  # fmt: skip
    ),
    st.booleans(),
)
def test_glu_matches_reference(gate_up: tuple[np.ndarray, np.ndarray], gelu: bool) -> None:
    gate, up = gate_up
    out = run(gate, up, gelu)
    g, u = gate.astype(np.float64), up.astype(np.float64)
    exact = (reference.gelu_tanh(g) if gelu else reference.silu(g)) * u
    reference_error = np.abs(g * u) * 2.0**-52 if gelu else 0
    subnormal = 2.0**-149 * (1 + np.abs(u))  # act and act * up rounded among subnormals
    bound = (8 + 5 * np.abs(z_of(g, gelu))) * U32 * np.abs(exact) + reference_error + subnormal
    err = np.abs(out - exact)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > {bound[worst]:.3g} at g = {g[worst]}"


@settings(max_examples=50, deadline=None)
@given(arrays(F32, (5, 64), elements=st.floats(-1e6, 1e6, width=32)), st.booleans())
def test_a_row_alone_equals_the_row_in_a_batch(gate: np.ndarray, gelu: bool) -> None:
    up = np.ones_like(gate)
    batched = run(gate, up, gelu)
    for t in range(len(gate)):
        assert np.array_equal(run(gate[t : t + 1], up[t : t + 1], gelu)[0], batched[t])


def test_ends() -> None:
    gate = np.array([[0, 1e30, -1e30, 100, -100, -0.0]], F32)
    up = np.ones_like(gate)
    for gelu in (False, True):
        out = run(gate, up, gelu)
        assert out[0, 0] == 0 and out[0, 1] == F32(1e30) and out[0, 2] == 0
        assert out[0, 3] == 100 and -1e-30 < out[0, 4] <= 0


def test_one_thread_and_parallel_give_the_same_bits() -> None:
    """Below PARALLEL_TOKENS tokens the ops loop on one thread, from there in parallel:
    each token's result is bitwise the same either way (rms_norm, rope, glu)."""
    T = layer_ops.PARALLEL_TOKENS + 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, 4, 8), dtype=F32)
    w = rng.standard_normal(32, dtype=F32)
    positions = rng.permutation(T).astype(np.int32)
    cos, sin = rng.standard_normal((2, T, 4), dtype=F32)
    for neox in (False, True):
        batch, alone = x.copy(), x.copy()
        layer_ops.rope(batch, positions, cos, sin, neox)
        for t in range(T):
            layer_ops.rope(alone[t : t + 1], positions[t : t + 1], cos, sin, neox)
        np.testing.assert_array_equal(batch, alone)
    flat = x.reshape(T, -1)
    batch, alone = np.empty_like(flat), np.empty_like(flat)
    layer_ops.rms_norm(flat, w, 1e-5, batch)
    for t in range(T):
        layer_ops.rms_norm(flat[t : t + 1], w, 1e-5, alone[t : t + 1])
    np.testing.assert_array_equal(batch, alone)
    for gelu in (False, True):
        alone = np.concatenate([run(flat[t : t + 1], flat[t : t + 1], gelu) for t in range(T)])
        np.testing.assert_array_equal(run(flat, flat, gelu), alone)
