"""refinfer/ggml/ops.py (ggml's arithmetic in NumPy) and the Numba kernels that follow it.

What is held:
- each kernel equals its NumPy twin bitwise: kernels.expf.fma_f32 / ops.fma (hypothesis
  floats and near-cancelling sums), expf_ggml / ops.expf (every branch: ordinary, the
  |n| > 126 and |n| > 192 lanes, +-inf, NaN, subnormal results), round_f16,
  layer_ops.rms_norm_ggml / ops.rms_norm, layer_ops.glu_ggml / ops.swiglu and ops.geglu
  (rows that are and are not multiples of 8; one thread and parallel);
- each twin computes what it names: fma is correctly rounded where float64 rounding
  would round twice; expf is within 2 ulp of exp; rms_norm is within a few float32
  roundings of float64 math; softmax equals a scalar loop written from
  ggml_vec_soft_max_f32; the RoPE tables are ggml's float32 angle chain and within its
  rounding of the exact angles; the GELU table is GELU rounded to float16.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba import njit

from refinfer import model, reference
from refinfer.config import RopeScaling
from refinfer.errors import UnsupportedModelError
from refinfer.ggml import ops
from refinfer.kernels.expf import expf_ggml, f16_bits, fma_f32, round_f16
from refinfer.kernels.layer_ops import PARALLEL_TOKENS, glu_ggml, rms_norm_ggml

F32 = np.float32
U32 = 2.0**-24  # unit roundoff of float32


def assert_bitwise(a: np.ndarray, b: np.ndarray) -> None:
    """Same bits, but any NaN equals any NaN."""
    a, b = np.asarray(a, dtype=F32), np.asarray(b, dtype=F32)
    same = (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))
    assert same.all(), f"{(~same).sum()} differ, first at {np.argwhere(~same)[0]}"


def floats32(**kw) -> st.SearchStrategy:
    return st.floats(width=32, **kw)


def arrays32(n: int, **kw) -> st.SearchStrategy:
    return hnp.arrays(F32, n, elements=floats32(**kw))


# ---- scalar kernels over arrays -----------------------------------------------------


@njit(cache=True)
def _fma_loop(a, b, c, out):
    for i in range(a.shape[0]):
        out[i] = fma_f32(a[i], b[i], c[i])


@njit(cache=True)
def _expf_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = expf_ggml(x[i])


@njit(cache=True)
def _f16_loop(x, out, bits):
    for i in range(x.shape[0]):
        out[i] = round_f16(x[i])
        bits[i] = f16_bits(x[i])


def kernel_fma(a, b, c):
    out = np.empty(len(a), F32)
    _fma_loop(*(np.ascontiguousarray(v, dtype=F32) for v in (a, b, c)), out)
    return out


def kernel_expf(x):
    out = np.empty(len(x), F32)
    _expf_loop(np.ascontiguousarray(x, dtype=F32), out)
    return out


# ---- fma ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(arrays32(16), arrays32(16), arrays32(16))
def test_fma_matches_llvm_fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    assert_bitwise(ops.fma(a, b, c), kernel_fma(a, b, c))


@settings(max_examples=200)
@given(arrays32(16, allow_nan=False, allow_infinity=False), st.integers(0, 2**32 - 1))
def test_fma_matches_llvm_fma_when_the_sum_cancels(a: np.ndarray, seed: int) -> None:
    """c = -a b (1 + tiny): the exact sum is small and every bit of the product counts."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(16).astype(F32) * F32(2) ** rng.integers(-60, 60, 16).astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):
        c = (-(a * b) * (F32(1) + rng.standard_normal(16).astype(F32) * F32(1e-6))).astype(F32)
    assert_bitwise(ops.fma(a, b, c), kernel_fma(a, b, c))


def test_fma_rounds_once_where_float64_would_round_twice() -> None:
    """a b + c = 1 + 2^-24 + 2^-70: float64 drops 2^-70, leaving a tie that rounds to 1.

    The correctly rounded float32 is 1 + 2^-23 (above the tie); so is llvm.fma.
    """
    a, b = F32(1 + 2.0**-23), F32(1 - 2.0**-24)
    c = F32(2.0**-47 + 2.0**-70)
    naive = F32(np.float64(a) * np.float64(b) + np.float64(c))
    assert naive == F32(1)
    assert ops.fma(a, b, c) == F32(1 + 2.0**-23) == kernel_fma([a], [b], [c])[0]


# ---- expf --------------------------------------------------------------------------

# every branch of ggml_v_expf: ordinary, |n| > 126 (x beyond about +-87.3), |n| > 192
# (beyond about +-133), around the overflow and flush thresholds, specials
EXPF_EDGES = np.array(
    [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 87.0, 87.33, 87.34, 88.0, 88.37, 88.38, 88.72, 88.73,
     -87.0, -87.33, -87.34, -100.0, -103.0, -103.97, -103.98, -104.0, -110.0, 133.0, 134.0,
     -133.0, -134.0, 1e30, -1e30, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38],
    dtype=F32,
)  # fmt: skip


@settings(max_examples=300)
@given(arrays32(24))
def test_expf_kernel_equals_twin(x: np.ndarray) -> None:
    assert_bitwise(kernel_expf(x), ops.expf(x))


def test_expf_kernel_equals_twin_on_every_branch() -> None:
    x = np.concatenate([EXPF_EDGES, np.linspace(-140, 140, 200_001, dtype=F32)])
    assert_bitwise(kernel_expf(x), ops.expf(x))
    n = np.abs(np.rint(x.astype(np.float64) / np.log(2)))
    assert (n > 126).any() and (n > 192).any() and (n <= 126).any()  # all three taken


def test_expf_special_values() -> None:
    y = ops.expf(np.array([-np.inf, np.inf, np.nan, 0.0, -200.0, 200.0], dtype=F32))
    assert y[0] == 0 and y[1] == np.inf and np.isnan(y[2]) and y[3] == 1
    assert y[4] == 0 and y[5] == np.inf


def test_expf_within_2_ulp_of_exp() -> None:
    """ggml states 1.45 + 0.5 ulp; checked over [-103, 88.7] including subnormal results."""
    x = np.linspace(-103.0, 88.72, 1_000_003, dtype=F32)
    y = ops.expf(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(F32)).astype(np.float64)
    err = np.abs(y - exact) / ulp
    assert err.max() < 2.0, f"{err.max():.3f} ulp at x = {x[np.argmax(err)]}"
    assert err.max() > 1.0  # it is ggml's polynomial, not a correctly rounded exp


# ---- float16 -------------------------------------------------------------------------


def test_round_f16_ties_to_even_and_saturates_as_f16c() -> None:
    x = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 65504.0, 65519.0, 65520.0, 2.0**-25,
                  2.0**-25 + 2.0**-40, -0.0], dtype=F32)  # fmt: skip
    expected = np.array([1.0, 1 + 2.0**-9, 65504.0, 65504.0, np.inf, 0.0, 2.0**-24, -0.0])
    assert_bitwise(ops.round_f16(x), expected.astype(F32))


@settings(max_examples=200)
@given(arrays32(32))
def test_round_f16_kernel_equals_twin(x: np.ndarray) -> None:
    out, bits = np.empty(32, F32), np.empty(32, np.int64)
    _f16_loop(x, out, bits)
    assert_bitwise(out, ops.round_f16(x))
    with np.errstate(over="ignore"):
        expected_bits = x.astype(np.float16).view(np.uint16).astype(np.int64)
    finite = ~np.isnan(x)  # NaN payloads are not specified
    assert np.array_equal(bits[finite], expected_bits[finite])


# ---- RMSNorm ---------------------------------------------------------------------------


@st.composite
def token_rows(draw: st.DrawFn, max_d: int = 300) -> np.ndarray:
    """float32[T, D], T on both sides of PARALLEL_TOKENS, values of varied magnitude."""
    T = draw(st.sampled_from([1, 3, PARALLEL_TOKENS + 2]))
    D = draw(st.integers(1, max_d))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = F32(2.0 ** draw(st.integers(-20, 20)))
    return (rng.standard_normal((T, D)) * scale).astype(F32)


@settings(max_examples=60)
@given(token_rows(), st.sampled_from([1e-5, 1e-6, 1e-12]))
def test_rms_norm_kernel_equals_twin(x: np.ndarray, eps: float) -> None:
    w = np.random.default_rng(x.shape[1]).standard_normal(x.shape[1]).astype(F32)
    out = np.empty_like(x)
    rms_norm_ggml(x, w, eps, out)
    assert_bitwise(out, ops.rms_norm(x, w, eps))
    rms_norm_ggml(x, w, eps, x)  # in place, as model.py does for q/k norms
    assert_bitwise(x, out)


@settings(max_examples=60)
@given(token_rows(), st.sampled_from([1e-5, 1e-6]))
def test_rms_norm_twin_close_to_float64(x: np.ndarray, eps: float) -> None:
    """Per element within 7 float32 roundings of the float64 result (a rounding count:
    squares 1/2, mean 1/2, + eps 1/2, sqrt 1, division 1, two products 2, + slack)."""
    w = np.random.default_rng(1).standard_normal(x.shape[1]).astype(F32)
    x64 = x.astype(np.float64)
    eps32 = np.float64(F32(eps))
    exact = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps32) * w
    err = np.abs(ops.rms_norm(x, w, eps) - exact)
    assert np.all(err <= 7 * U32 * np.abs(exact) + 1e-37)


# ---- SiLU, GELU ------------------------------------------------------------------------


@st.composite
def glu_inputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """gate, up float32[T, F]: F a multiple of 8 or not; gates out to +-30 (GELU's +-10
    limits, expf's overflow at -88 through a few large values)."""
    g = token_rows(max_d=70).map(lambda a: a / max(1e-30, np.abs(a).max()) * 30)
    gate = draw(g).astype(F32)
    if draw(st.booleans()):
        gate.flat[:: max(1, gate.size // 3)] = draw(st.sampled_from([-100.0, 95.0, -10.0, 10.0]))
    up = np.random.default_rng(gate.size).standard_normal(gate.shape).astype(F32)
    return gate, up


@settings(max_examples=60)
@given(glu_inputs(), st.booleans())
def test_glu_kernel_equals_twin(inputs: tuple[np.ndarray, np.ndarray], gelu: bool) -> None:
    gate, up = inputs
    out = np.empty_like(gate)
    glu_ggml(gate, up, gelu, out)
    twin = ops.geglu(gate, up) if gelu else ops.swiglu(gate, up)
    assert_bitwise(out, twin)
    glu_ggml(gate, up, gelu, gate)  # in place, as model.py does
    assert_bitwise(gate, twin)


def test_swiglu_leftover_lanes_use_the_scalar_silu() -> None:
    """With F = 13 the last 5 take ggml_silu_f32 (C expf), the first 8 ggml_v_silu."""
    g = np.linspace(-5, 5, 13, dtype=F32)[None]
    u = np.ones_like(g)
    y = ops.swiglu(g, u)[0]
    assert_bitwise(y[:8], ops.silu(g[0, :8]))
    assert_bitwise(y[8:], ops.silu_scalar(g[0, 8:]))


@settings(max_examples=40)
@given(glu_inputs())
def test_swiglu_twin_close_to_float64(inputs: tuple[np.ndarray, np.ndarray]) -> None:
    gate, up = inputs
    g64 = gate.astype(np.float64)
    exact = g64 / (1 + np.exp(-g64)) * up
    err = np.abs(ops.swiglu(gate, up) - exact)
    assert np.all(err <= 8 * U32 * np.abs(exact) + 1e-35)  # expf <= 2 ulp, 4 roundings


def gelu64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_gelu_table_is_gelu_rounded_to_f16() -> None:
    """Every finite entry is GELU of its float16 argument, rounded to float16.

    Within one f16 ulp (half for the rounding, the rest as float32 may move the value
    across a rounding boundary), plus what ggml's float32 formula loses where 1 + tanh(u)
    cancels (x < -3: 0.5 |x| times 2 float32 ulps of tanh near -1)."""
    table = ops.gelu_table()
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
    ok = np.isfinite(x) & (np.abs(x) < 10)
    exact = gelu64(x[ok].astype(np.float64))
    f16_ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    cancel = np.abs(x[ok]) * 2 * U32
    assert np.all(np.abs(table[ok] - exact) <= f16_ulp + cancel)
    assert table[np.float16(1).view(np.uint16)] == np.float16(gelu64(1.0))


@settings(max_examples=40)
@given(glu_inputs())
def test_geglu_twin_close_to_float64(inputs: tuple[np.ndarray, np.ndarray]) -> None:
    """Within float16 roundings of the argument (|GELU'| <= 1.13) and of the value."""
    gate, up = inputs
    g64 = gate.astype(np.float64)
    exact = gelu64(g64) * up
    bound = (1.13 * 2.0**-11 * np.abs(g64) + 2.0**-11 * np.abs(gelu64(g64)) + 2.0**-24) * np.abs(
        up
    ) + 8 * U32 * np.abs(exact)
    bound = np.where(g64 <= -10, np.abs(exact) + 1e-30, bound)  # ggml returns 0 there
    assert np.all(np.abs(ops.geglu(gate, up) - exact) <= bound)


# ---- softmax -----------------------------------------------------------------------


def softmax_scalar(s: np.ndarray, scale: float, mask: np.ndarray) -> np.ndarray:
    """ggml_compute_forward_soft_max_f32 + ggml_vec_soft_max_f32 (AVX2) as scalar Python."""
    n = len(s)
    w = [F32(F32(s[i]) * F32(scale)) + F32(mask[i]) for i in range(n)]
    top = max(w)
    e = [F32(0)] * n
    total = 0.0
    i = 0
    while i + 8 <= n:
        lanes = [ops.expf(np.array([w[i + j] - top], F32))[0] for j in range(8)]
        e[i : i + 8] = lanes
        lo = [lanes[j + 4] + lanes[j] for j in range(4)]  # _mm_add_ps(high, low)
        lo2 = [lo[0] + lo[2], lo[1] + lo[3]]  # movehl
        total += float(lo2[0] + lo2[1])  # movehdup, add_ss
        i += 8
    for j in range(i, n):
        e[j] = F32(np.exp(np.float64(w[j] - top)))
        total += float(e[j])
    inv = F32(1.0 / total)
    return np.array([e[j] * inv for j in range(n)], dtype=F32)


@settings(max_examples=60)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_softmax_is_ggmls_loop(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(n) * 8).astype(F32)
    mask = np.where(rng.random(n) < 0.3, -np.inf, 0.0).astype(F32)
    mask[rng.integers(n)] = 0  # one visible entry at least
    p = ops.softmax(s[None], 0.125, mask[None])[0]
    assert_bitwise(p, softmax_scalar(s, 0.125, mask))
    assert np.all(p[mask == -np.inf] == 0)
    assert abs(p.astype(np.float64).sum() - 1) < n * 4 * U32


def test_hsum8_order() -> None:
    """((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): 2^25 + 1 - 2^25 is 0, not 1."""
    v = np.array([2.0**25, 0, 0, 0, 1, 0, 0, 0], dtype=F32)  # l0 + l4 = 2^25 (1 lost)
    assert ops.hsum8(v) == 2.0**25
    v = np.array([2.0**25, 0, -(2.0**25), 0, 1, 0, 0, 0], dtype=F32)  # (l0 + l4) + l2 = 0
    assert ops.hsum8(v) == 0
    v = np.array([2.0**25, 1, 0, 0, -(2.0**25), 0, 0, 0], dtype=F32)  # (l0 + l4) first: 1 kept
    assert ops.hsum8(v) == 1


# ---- RoPE ------------------------------------------------------------------------------


def rope_config(scaling: RopeScaling | None = None, base: float = 10000.0, dim: int = 64):
    """The fields rope_tables reads, as a stand-in for a ModelConfig."""
    return SimpleNamespace(
        rope_scaling=scaling or RopeScaling(), rope_dim=dim, context_length=2048,
        layer_rope=lambda layer: (base, True),
    )  # fmt: skip


@pytest.mark.parametrize(
    "scaling, factors",
    [(RopeScaling(), False), (RopeScaling("linear", factor=4.0), False),
     (RopeScaling("none", freq_factors="rope_freqs"), True),
     (RopeScaling("longrope", freq_factors="f", attn_factor=1.19), True)],
)  # fmt: skip
def test_rope_tables_close_to_exact_angles(scaling: RopeScaling, factors: bool) -> None:
    """Within the float32 chain's rounding of model.rope_tables (float64 angles): theta_i
    has i + 2 roundings, so |d angle| <= (i + 3) u angle, plus the cos/sin/attn roundings."""
    c = rope_config(scaling, base=500000.0, dim=64)
    ff = np.linspace(1, 8, 32).astype(F32) if factors else None
    cos, sin = ops.rope_tables(c, ff, 0)
    cos64, sin64 = model.rope_tables(c, ff, 0)  # float32 of float64 values
    assert cos.shape == sin.shape == (2048, 32) and cos.dtype == sin.dtype == F32
    i = np.arange(32)
    angle = np.arange(2048)[:, None] * reference.rope_frequencies(c, ff, 0)[None]  # (P, 32)
    bound = (i + 4) * U32 * angle * scaling.attn_factor + 4 * U32
    assert np.all(np.abs(cos - cos64) <= bound)
    assert np.all(np.abs(sin - sin64) <= bound)


def test_rope_tables_are_ggmls_float32_chain() -> None:
    """Entry (p, i): theta = p, multiplied i times by powf(base, -2/n) in float32."""
    c = rope_config(base=10000.0, dim=64)
    cos, sin = ops.rope_tables(c, None, 0)
    ts = F32(np.power(np.float64(10000.0), np.float64(F32(-2.0) / F32(64))))
    for p, i in ((1000, 5), (2047, 31), (1, 0), (7, 17)):
        theta = F32(p)
        for _ in range(i):
            theta = F32(theta * ts)
        assert cos[p, i] == F32(np.cos(np.float64(theta)))
        assert sin[p, i] == F32(np.sin(np.float64(theta)))
    # not the same as rounding p base^(-2i/n) once: the chain differs somewhere
    direct = np.cos(np.arange(2048)[:, None] * 10000.0 ** (-np.arange(32) / 32)).astype(F32)
    assert not np.array_equal(cos, direct)


def test_rope_tables_refuse_yarn() -> None:
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ops.rope_tables(rope_config(RopeScaling("yarn", factor=4.0)), None, 0)


def test_kq_scale_is_float32_of_float32_sqrt() -> None:
    assert ops.kq_scale(64) == F32(0.125)
    assert ops.kq_scale(128) == F32(1) / np.sqrt(F32(128))
