"""kernels.expf: the Numba expf against its NumPy twin (bitwise) and against float64 exp.

What is held:
- the kernel and `expf_numpy` give the same bits on any float32 (hypothesis), the ends,
  infinities and NaN included;
- over a sweep of every 613th float32 in [LO, HI] (about 3.7 million values), the result
  is within 1 ulp of float64 exp rounded to float32, and mostly equal to it; the whole
  range was measured once the same way (the module docstring's figures);
- exp(0) == 1 exactly, exp is monotone, and the ends: +inf above HI, 0 below LO.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refinfer.kernels.expf import HI, LO, _exp_loop, expf_numpy

F32 = np.float32


def kernel(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    _exp_loop(x, out)
    return out


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, F32).view(np.uint32)


def ordinal(a: np.ndarray) -> np.ndarray:
    """float32 -> int64 such that adjacent floats differ by 1 (distance in ulp)."""
    i = np.asarray(a, F32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def sweep(stride: int) -> np.ndarray:
    """Every stride-th float32 in [LO, HI], in increasing order (bit patterns stepped)."""
    top = int(bits(HI))
    bottom = int(bits(LO)) & 0x7FFFFFFF
    negative = (np.arange(bottom, -1, -stride, dtype=np.uint32) | np.uint32(1 << 31)).view(F32)
    positive = np.arange(0, top + 1, stride, dtype=np.uint32).view(F32)
    return np.concatenate([negative, positive, [HI]])


@settings(max_examples=200, deadline=None)
@given(arrays(F32, st.integers(1, 300), elements=st.floats(width=32)))
def test_kernel_equals_numpy_twin_bitwise(x: np.ndarray) -> None:
    assert np.array_equal(bits(kernel(x)), bits(expf_numpy(x)))


def test_within_one_ulp_of_float64_exp() -> None:
    x = sweep(613)
    out = kernel(x)
    assert np.array_equal(bits(out), bits(expf_numpy(x)))
    exact = np.exp(x.astype(np.float64)).astype(F32)  # correctly rounded (nearly always)
    ulps = np.abs(ordinal(out) - ordinal(exact))
    assert ulps.max() <= 1, f"{ulps.max()} ulp at x = {x[np.argmax(ulps)]!r}"
    assert np.mean(ulps == 0) > 0.98


def test_monotone() -> None:
    x = sweep(97)
    assert np.all(np.diff(kernel(x)) >= 0)


def test_exact_points_and_ends() -> None:
    big = np.nextafter(HI, F32(np.inf))
    tiny = np.nextafter(LO, F32(-np.inf))
    x = np.array([0, -0.0, 1, HI, big, LO, tiny, np.inf, -np.inf, np.nan, -1e30, 1e30], F32)
    out = kernel(x)
    assert out[0] == 1 and out[1] == 1  # exp(0) == 1 exactly: the online softmax needs it
    assert out[2] == np.exp(np.float64(1)).astype(F32)
    assert np.isfinite(out[3]) and out[3] > 3.4e38 and out[4] == np.inf
    assert out[5] >= 0 and out[6] == 0
    assert out[7] == np.inf and out[8] == 0 and np.isnan(out[9])
    assert out[10] == 0 and out[11] == np.inf
