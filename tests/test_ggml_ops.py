"""refinfer/ggml/ops.py (ggml's arithmetic in NumPy) and the Numba kernels that follow it.

What is held:
- each kernel equals its NumPy twin bitwise, for both x86 builds where the bits depend on
  it (ops.Simd: 8 lanes, AVX2; 16 lanes, AVX-512): kernels.expf.fma_f32 / ops.fma
  (hypothesis floats and near-cancelling sums), expf_ggml and expf_ggml_avx512 (through
  expf_ggml_lanes) / ops.expf (every branch: ordinary, the |n| > 126 and |n| > 192 lanes,
  +-inf, NaN, subnormal results), round_f16, layer_ops.rms_norm_ggml / ops.rms_norm,
  layer_ops.glu_ggml / ops.swiglu and ops.geglu (rows that are and are not multiples of
  16; one thread and parallel), layer_ops.rope_ggml / ops.rope (neox and not, partial
  rotary dims);
- each twin computes what it names: fma is correctly rounded where float64 rounding
  would round twice; both expf are within 2.5 ulp of exp and differ from each other;
  rms_norm is within a few float32 roundings of float64 math; softmax equals a scalar
  loop written from ggml_vec_soft_max_f32 (AVX2 and AVX-512 reductions); hsum halves;
  RoPE's rotation is fused (it differs from layer_ops.rope); the RoPE tables are ggml's
  float32 angle chain through the C library's cosf / sinf, and within its rounding of the
  exact angles; the GELU table is GELU rounded to float16.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
from refinfer.kernels.expf import expf_ggml_lanes, f16_bits, fma_f32, round_f16
from refinfer.kernels.layer_ops import PARALLEL_TOKENS, glu_ggml, rms_norm_ggml, rope, rope_ggml

F32 = np.float32
U32 = 2.0**-24  # unit roundoff of float32
LANES = [8, 16]  # ops.SIMD: AVX2, AVX-512


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
def _expf_loop(x, lanes, out):
    for i in range(x.shape[0]):
        out[i] = expf_ggml_lanes(x[i], lanes)  # expf_ggml (8) or expf_ggml_avx512 (16)


@njit(cache=True)
def _f16_loop(x, out, bits):
    for i in range(x.shape[0]):
        out[i] = round_f16(x[i])
        bits[i] = f16_bits(x[i])


def kernel_fma(a, b, c):
    out = np.empty(len(a), F32)
    _fma_loop(*(np.ascontiguousarray(v, dtype=F32) for v in (a, b, c)), out)
    return out


def kernel_expf(x, lanes):
    out = np.empty(len(x), F32)
    _expf_loop(np.ascontiguousarray(x, dtype=F32), lanes, out)
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


@pytest.mark.parametrize("lanes", LANES)
@settings(max_examples=200)
@given(arrays32(24))
def test_expf_kernel_equals_twin(lanes: int, x: np.ndarray) -> None:
    assert_bitwise(kernel_expf(x, lanes), ops.expf(x, lanes))


@pytest.mark.parametrize("lanes", LANES)
def test_expf_kernel_equals_twin_on_every_branch(lanes: int) -> None:
    x = np.concatenate([EXPF_EDGES, np.linspace(-140, 140, 200_001, dtype=F32)])
    y = ops.expf(x, lanes)
    assert_bitwise(kernel_expf(x, lanes), y)
    n = np.abs(np.rint(x.astype(np.float64) / np.log(2)))
    assert (n > 126).any() and (n > 192).any() and (n <= 126).any()  # all three taken
    assert ((y > 0) & (y < 2.0**-126)).any()  # subnormal results
    assert np.isinf(y).any() and (y == 0).any() and np.isnan(y).any()


@pytest.mark.parametrize("lanes", LANES)
def test_expf_special_values(lanes: int) -> None:
    y = ops.expf(np.array([-np.inf, np.inf, np.nan, 0.0, -200.0, 200.0], dtype=F32), lanes)
    assert y[0] == 0 and y[1] == np.inf and np.isnan(y[2]) and y[3] == 1
    assert y[4] == 0 and y[5] == np.inf


@pytest.mark.parametrize("lanes, most", [(8, 2.0), (16, 2.5)])
def test_expf_within_its_ulp_bound_of_exp(lanes: int, most: float) -> None:
    """ggml states 1.45 + 0.5 ulp for the AVX2 variant (1.89 measured here); the AVX-512
    one rounds twice near 1 (fma(c4, b, 1), then the outer fma) and measures 2.20.
    Checked over [-103, 88.7] including subnormal results."""
    x = np.linspace(-103.0, 88.72, 1_000_003, dtype=F32)
    y = ops.expf(x, lanes).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(F32)).astype(np.float64)
    err = np.abs(y - exact) / ulp
    assert err.max() < most, f"{err.max():.3f} ulp at x = {x[np.argmax(err)]}"
    assert err.max() > 1.0  # it is ggml's polynomial, not a correctly rounded exp


def test_expf_avx2_and_avx512_differ() -> None:
    """The two builds' polynomials round differently (about a quarter of the values), so
    `lanes` really chooses the variant, in the twin and in the kernel."""
    x = np.linspace(-20, 20, 4001, dtype=F32)
    avx2, avx512 = ops.expf(x, 8), ops.expf(x, 16)
    assert 0.05 < (avx2 != avx512).mean() < 0.6
    assert np.all(np.abs(avx2 - avx512) <= 4 * U32 * avx2)  # both e^x
    assert_bitwise(kernel_expf(x, 8), avx2)
    assert_bitwise(kernel_expf(x, 16), avx512)
    assert_bitwise(ops.expf(x), ops.expf(x, ops.LANES))  # the default: this host's build


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
def token_rows(draw: st.DrawFn, max_d: int = 300, whole: int = 0) -> np.ndarray:
    """float32[T, D], T on both sides of PARALLEL_TOKENS, values of varied magnitude.
    whole > 0: D is a multiple of `whole` half the time (no scalar leftovers)."""
    T = draw(st.sampled_from([1, 3, PARALLEL_TOKENS + 2]))
    D = draw(st.integers(1, max_d))
    if whole and draw(st.booleans()):
        D = whole * max(1, D // whole)
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
    """gate, up float32[T, F]: F a multiple of 16 or not; gates out to +-30 (GELU's +-10
    limits, expf's overflow at -88 through a few large values)."""
    g = token_rows(max_d=70, whole=16).map(lambda a: a / max(1e-30, np.abs(a).max()) * 30)
    gate = draw(g).astype(F32)
    if draw(st.booleans()):
        gate.flat[:: max(1, gate.size // 3)] = draw(st.sampled_from([-100.0, 95.0, -10.0, 10.0]))
    up = np.random.default_rng(gate.size).standard_normal(gate.shape).astype(F32)
    return gate, up


@pytest.mark.parametrize("lanes", LANES)
@settings(max_examples=40)
@given(glu_inputs(), st.booleans())
def test_glu_kernel_equals_twin(
    lanes: int, inputs: tuple[np.ndarray, np.ndarray], gelu: bool
) -> None:  # fmt: skip
    gate, up = inputs
    out = np.empty_like(gate)
    glu_ggml(gate, up, gelu, out, lanes)
    twin = ops.geglu(gate, up) if gelu else ops.swiglu(gate, up, lanes)
    assert_bitwise(out, twin)
    glu_ggml(gate, up, gelu, gate, lanes)  # in place, as model.py does
    assert_bitwise(gate, twin)


@pytest.mark.parametrize("F", [32, 40])
def test_glu_lanes_choose_the_build(F: int) -> None:
    """SwiGLU rows of 32 (whole groups for both builds) and 40 (8 scalar leftovers on
    AVX-512): lanes 8 and 16 give different bits, each its twin's; no lanes: the host's."""
    rng = np.random.default_rng(F)
    gate = (rng.standard_normal((3, F)) * 6).astype(F32)
    up = rng.standard_normal((3, F)).astype(F32)
    outs = {}
    for lanes in (8, 16, None):
        outs[lanes] = np.empty_like(gate)
        glu_ggml(gate, up, False, outs[lanes], lanes)
    assert_bitwise(outs[8], ops.swiglu(gate, up, 8))
    assert_bitwise(outs[16], ops.swiglu(gate, up, 16))
    assert_bitwise(outs[None], outs[ops.LANES])
    assert not np.array_equal(outs[8], outs[16])


@pytest.mark.parametrize("lanes", LANES)
def test_swiglu_leftover_lanes_use_the_scalar_silu(lanes: int) -> None:
    """With F = lanes + 5 the last 5 take ggml_silu_f32 (C expf), the first `lanes`
    ggml_v_silu."""
    g = np.linspace(-5, 5, lanes + 5, dtype=F32)[None]
    u = np.ones_like(g)
    y = ops.swiglu(g, u, lanes)[0]
    assert_bitwise(y[:lanes], ops.silu(g[0, :lanes], lanes))
    assert_bitwise(y[lanes:], ops.silu_scalar(g[0, lanes:]))


@pytest.mark.parametrize("lanes", LANES)
@settings(max_examples=30)
@given(glu_inputs())
def test_swiglu_twin_close_to_float64(lanes: int, inputs: tuple[np.ndarray, np.ndarray]) -> None:
    gate, up = inputs
    g64 = gate.astype(np.float64)
    exact = g64 / (1 + np.exp(-g64)) * up
    err = np.abs(ops.swiglu(gate, up, lanes) - exact)
    assert np.all(err <= 8 * U32 * np.abs(exact) + 1e-35)  # expf <= 2.5 ulp, 4 roundings


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


def reduce_avx2(lanes: list) -> np.float32:
    """AVX2 ggml_vec_soft_max_f32's group sum, intrinsic by intrinsic."""
    lo = [lanes[j + 4] + lanes[j] for j in range(4)]  # _mm_add_ps(high, low)
    lo2 = [lo[0] + lo[2], lo[1] + lo[3]]  # movehl
    return lo2[0] + lo2[1]  # movehdup, add_ss


def reduce_avx512(lanes: list) -> np.float32:
    """_mm512_reduce_add_ps as GCC's avx512fintrin.h (__MM512_REDUCE_OP) writes it."""
    t3 = [lanes[j + 8] + lanes[j] for j in range(8)]  # extractf64x4 1 + 0
    t6 = [t3[j + 4] + t3[j] for j in range(4)]  # extractf128 1 + 0
    t8 = [t6[j] + t6[j + 2] for j in range(2)]  # + shuffle {2, 3, 0, 1}
    return t8[0] + t8[1]


def softmax_scalar(s: np.ndarray, scale: float, mask: np.ndarray, lanes: int) -> np.ndarray:
    """ggml_compute_forward_soft_max_f32 + ggml_vec_soft_max_f32 (AVX2 or AVX-512) as
    scalar Python."""
    reduce = reduce_avx512 if lanes == 16 else reduce_avx2
    n = len(s)
    w = [F32(F32(s[i]) * F32(scale)) + F32(mask[i]) for i in range(n)]
    top = max(w)
    e = [F32(0)] * n
    total = 0.0
    i = 0
    while i + lanes <= n:
        group = [ops.expf(np.array([w[i + j] - top], F32), lanes)[0] for j in range(lanes)]
        e[i : i + lanes] = group
        total += float(reduce(group))
        i += lanes
    for j in range(i, n):
        e[j] = F32(np.exp(np.float64(w[j] - top)))
        total += float(e[j])
    inv = F32(1.0 / total)
    return np.array([e[j] * inv for j in range(n)], dtype=F32)


@pytest.mark.parametrize("lanes", LANES)
@settings(max_examples=40)
@given(st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_softmax_is_ggmls_loop(lanes: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(n) * 8).astype(F32)
    mask = np.where(rng.random(n) < 0.3, -np.inf, 0.0).astype(F32)
    mask[rng.integers(n)] = 0  # one visible entry at least
    p = ops.softmax(s[None], 0.125, mask[None], lanes)[0]
    assert_bitwise(p, softmax_scalar(s, 0.125, mask, lanes))
    assert np.all(p[mask == -np.inf] == 0)
    assert abs(p.astype(np.float64).sum() - 1) < n * 4 * U32


def test_hsum_8_lanes_order() -> None:
    """((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): 2^25 + 1 - 2^25 is 0, not 1."""
    v = np.array([2.0**25, 0, 0, 0, 1, 0, 0, 0], dtype=F32)  # l0 + l4 = 2^25 (1 lost)
    assert ops.hsum(v) == 2.0**25
    v = np.array([2.0**25, 0, -(2.0**25), 0, 1, 0, 0, 0], dtype=F32)  # (l0 + l4) + l2 = 0
    assert ops.hsum(v) == 0
    v = np.array([2.0**25, 1, 0, 0, -(2.0**25), 0, 0, 0], dtype=F32)  # (l0 + l4) first: 1 kept
    assert ops.hsum(v) == 1


def test_hsum_16_lanes_order() -> None:
    """(l_i + l_{i+8}), then + 4, + 2, + 1 apart: not two 8-lane hsums added."""

    def lanes(**at: float) -> np.ndarray:
        v = np.zeros(16, dtype=F32)
        for k, x in at.items():
            v[int(k[1:])] = x
        return v

    assert ops.hsum(lanes(l0=2.0**25, l8=1)) == 2.0**25  # l0 + l8 = 2^25 (1 lost)
    assert ops.hsum(lanes(l0=2.0**25, l4=-(2.0**25), l8=1)) == 0  # (l0 + l8) + (l4 + l12)
    assert ops.hsum(lanes(l0=2.0**25, l4=1, l8=-(2.0**25))) == 1  # (l0 + l8) first: 1 kept
    assert reduce_avx2(lanes(l0=2.0**25, l4=1, l8=-(2.0**25))[:8]) == 2.0**25  # 8 lanes lose it
    rng = np.random.default_rng(5)
    v = (rng.standard_normal((500, 16)) * 2.0 ** rng.integers(-10, 10, (500, 16))).astype(F32)
    assert_bitwise(ops.hsum(v), [reduce_avx512(list(r)) for r in v])
    assert_bitwise(ops.hsum(v[:, :8]), [reduce_avx2(list(r)) for r in v[:, :8]])


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


def libm_f32(name: str):
    """The C library's float32 cosf / sinf through ctypes, or None where none is found."""
    path = ctypes.util.find_library("m")
    if path is None:
        return None
    fn = getattr(ctypes.CDLL(path), name)
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


def test_rope_tables_are_ggmls_float32_chain_through_libm() -> None:
    """Entry (p, i): theta = p, multiplied i times by powf(base, -2/n) in float32, then the
    C library's cosf / sinf: equal to ctypes cosf / sinf on a sample, and every entry
    within 1 ulp of the float64 cos / sin of the same float32 angle."""
    c = rope_config(base=10000.0, dim=64)
    cos, sin = ops.rope_tables(c, None, 0)
    ts = F32(np.power(np.float64(10000.0), np.float64(F32(-2.0) / F32(64))))
    theta = np.empty((2048, 32), dtype=F32)  # the chain, column by column
    theta[:, 0] = np.arange(2048, dtype=F32)
    for i in range(1, 32):
        theta[:, i] = theta[:, i - 1] * ts
    for p, i in ((1000, 5), (2047, 31), (1, 0), (7, 17)):  # the chain, one product at a time
        t = F32(p)
        for _ in range(i):
            t = F32(t * ts)
        assert theta[p, i] == t
    for table, f64 in ((cos, np.cos), (sin, np.sin)):
        exact = f64(theta.astype(np.float64))
        ulp = np.spacing(np.abs(exact).astype(F32)).astype(np.float64)
        assert np.all(np.abs(table - exact) <= ulp)
    cosf, sinf = libm_f32("cosf"), libm_f32("sinf")
    if cosf is not None:
        rng = np.random.default_rng(0)
        for p, i in zip(rng.integers(0, 2048, 400), rng.integers(0, 32, 400), strict=True):
            assert cos[p, i] == F32(cosf(float(theta[p, i]))), (p, i)
            assert sin[p, i] == F32(sinf(float(theta[p, i]))), (p, i)
    # not the same as rounding p base^(-2i/n) once: the chain differs somewhere
    direct = np.cos(np.arange(2048)[:, None] * 10000.0 ** (-np.arange(32) / 32)).astype(F32)
    assert not np.array_equal(cos, direct)


@st.composite
def rope_inputs(draw: st.DrawFn):
    """x float32[T, heads, HD], positions int32[T], cos, sin float32[P, rope_dim / 2], neox:
    rope_dim <= HD (partial rotary dims stay), T on both sides of PARALLEL_TOKENS, angles
    from random tables (any float32 cos and sin in [-1, 1] exercise the rotation)."""
    T = draw(st.sampled_from([1, 5, PARALLEL_TOKENS + 1]))
    heads = draw(st.integers(1, 3))
    half = draw(st.integers(1, 40))
    HD = 2 * half + 2 * draw(st.sampled_from([0, 0, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    P = 64
    angle = rng.uniform(0, 2000, (P, half))
    cos, sin = np.cos(angle).astype(F32), np.sin(angle).astype(F32)
    scale = F32(2.0 ** draw(st.integers(-20, 20)))
    x = (rng.standard_normal((T, heads, HD)) * scale).astype(F32)
    positions = rng.integers(0, P, T).astype(np.int32)
    return x, positions, cos, sin, draw(st.booleans())


@settings(max_examples=60)
@given(rope_inputs())
def test_rope_ggml_kernel_equals_twin(inputs) -> None:
    x, positions, cos, sin, neox = inputs
    out = x.copy()
    rope_ggml(out, positions, cos, sin, neox)  # in place
    assert_bitwise(out, ops.rope(x, positions, cos, sin, neox))
    rot = 2 * cos.shape[1]
    assert_bitwise(out[..., rot:], x[..., rot:])  # dims past rope_dim stay


@pytest.mark.parametrize("neox", [False, True])
def test_rope_ggml_is_fused(neox: bool) -> None:
    """layer_ops.rope rounds every product (a c - b s, a s + b c in float32); rope_ggml fuses
    the first into an FMA: the two differ in some last bits, and stay within 2 ulp of the
    float64 rotation of the maximum of |a|, |b|."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 2, 64)).astype(F32)
    positions = np.array([0, 5, 200, 511], dtype=np.int32)
    angle = rng.uniform(0, 500, (512, 32))
    cos, sin = np.cos(angle).astype(F32), np.sin(angle).astype(F32)
    exact_mode, fused = x.copy(), x.copy()
    rope(exact_mode, positions, cos, sin, neox)
    rope_ggml(fused, positions, cos, sin, neox)
    ia = np.arange(32) * (1 if neox else 2)
    ib = ia + (32 if neox else 1)
    a, b = x[..., ia], x[..., ib]
    c, s = cos[positions][:, None], sin[positions][:, None]
    assert_bitwise(exact_mode[..., ia], a * c - b * s)
    assert_bitwise(exact_mode[..., ib], a * s + b * c)
    assert not np.array_equal(exact_mode, fused)
    a64, b64, c64, s64 = (v.astype(np.float64) for v in (a, b, c, s))
    big = np.maximum(np.abs(a64), np.abs(b64))
    assert np.all(np.abs(fused[..., ia] - (a64 * c64 - b64 * s64)) <= 2 * U32 * 2 * big)
    assert np.all(np.abs(fused[..., ib] - (a64 * s64 + b64 * c64)) <= 2 * U32 * 2 * big)


def test_rope_tables_refuse_yarn() -> None:
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ops.rope_tables(rope_config(RopeScaling("yarn", factor=4.0)), None, 0)


def test_kq_scale_is_float32_of_float32_sqrt() -> None:
    assert ops.kq_scale(64) == F32(0.125)
    assert ops.kq_scale(128) == F32(1) / np.sqrt(F32(128))
