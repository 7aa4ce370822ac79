"""The NumPy (de)quantisers of refinfer.quant against gguf.quants, and their error bounds."""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quant_blocks import random_blocks
from refinfer.errors import UnsupportedFormatError
from refinfer.quant import (
    BF16,
    F16,
    F32,
    FORMATS,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q8_0,
    QUANTIZE_FORMATS,
    dequantize,
    quantize,
)

BLOCK_FORMATS = [name for name, f in FORMATS.items() if f.block_size > 1]

EPS16 = 2.0**-11  # relative rounding of a float16 scale (10-bit mantissa, round to nearest)


def f16_error(v: np.ndarray) -> np.ndarray:
    """Largest rounding error of v -> float16: relative, or half the subnormal spacing 2^-24."""
    return np.maximum(np.abs(v) * EPS16, 2.0**-25)


@st.composite
def weights(draw: st.DrawFn, block: int = 32) -> np.ndarray:
    """float32[rows, blocks * block]: per-row scales from 1e-4 to 1e3, zeros and exact ties."""
    rows = draw(st.integers(1, 6))
    k = block * draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-4, 3, (rows, 1))
    if draw(st.booleans()):
        x[0, :block] = 0  # an all-zero block: the scale is 0, so must be every weight
    if draw(st.booleans()):  # half-way cases, where rounding rules differ
        x[-1, :block] = np.arange(block) - block / 2 + 0.5
    return x.astype(np.float32)


def _gguf_quantize(x: np.ndarray, fmt) -> np.ndarray:
    return gq.quantize(x, fmt.ggml_type).view(np.uint8).reshape(x.shape[0], -1)


def _gguf_dequantize(raw: np.ndarray, fmt) -> np.ndarray:
    if fmt is F32:
        return raw.view(np.float32)
    if fmt is F16:
        return raw.view(np.float16).astype(np.float32)
    return gq.dequantize(raw, fmt.ggml_type)


@pytest.mark.parametrize("name", QUANTIZE_FORMATS)
@given(x=weights())
def test_quantize_equals_gguf_quants(name: str, x: np.ndarray) -> None:
    fmt = FORMATS[name]
    ours = quantize(x, fmt)
    assert ours.shape == (x.shape[0], fmt.row_bytes(x.shape[1]))
    np.testing.assert_array_equal(ours, _gguf_quantize(x, fmt))


@pytest.mark.parametrize("name", QUANTIZE_FORMATS)
@given(x=weights(), seed=st.integers(0, 2**32 - 1))
def test_dequantize_of_quantized_equals_gguf_quants(name: str, x: np.ndarray, seed: int) -> None:
    fmt = FORMATS[name]
    raw = quantize(x, fmt)
    if fmt.block_size > 1:  # arbitrary quant bytes too (the f16 scales d, m kept finite)
        qs = raw.reshape(-1, fmt.type_size)[:, fmt.offset("qh" if fmt in (Q5_0, Q5_1) else "qs") :]
        qs[:] = np.random.default_rng(seed).integers(0, 256, qs.shape, dtype=np.uint8)
    np.testing.assert_array_equal(dequantize(raw, fmt), _gguf_dequantize(raw, fmt))


@pytest.mark.parametrize("name", BLOCK_FORMATS)
@given(n_blocks=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_dequantize_random_blocks_equals_gguf_quants(name: str, n_blocks: int, seed: int) -> None:
    # Any stored bytes (f16 scales finite): zero blocks, all-0xFF and all-0x00 quants included.
    fmt = FORMATS[name]
    raw = random_blocks(fmt, n_blocks, seed).reshape(1, -1)
    ours = dequantize(raw, fmt)
    assert ours.shape == (1, n_blocks * fmt.block_size) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, gq.dequantize(raw, fmt.ggml_type))


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_one_flipped_bit_moves_one_weight(name: str) -> None:
    # The comparison above can fail: flip each quant bit of a block in turn; exactly the
    # weights that bit belongs to change (1 weight, or a sub-block for a scale bit).
    fmt = FORMATS[name]
    raw = random_blocks(fmt, 1, seed=3, extremes=False)
    base = dequantize(raw, fmt)
    qs = fmt.offset("ql" if fmt.name == "q6_k" else "qs")
    for bit in range(8 * 4):
        flipped = raw.copy()
        flipped[0, qs + bit // 8] ^= 1 << (bit % 8)
        assert (dequantize(flipped, fmt) != base).sum() == 1, f"bit {bit} of the low quant bits"


def test_gguf_block_sizes_match_the_fields() -> None:
    from gguf.constants import GGML_QUANT_SIZES

    for fmt in FORMATS.values():
        assert GGML_QUANT_SIZES[fmt.ggml_type] == (fmt.block_size, fmt.type_size), fmt.name


def test_k_quants_are_read_not_written() -> None:
    with pytest.raises(UnsupportedFormatError, match="llama-quantize"):
        quantize(np.zeros((1, 256), np.float32), Q4_K)


def _block_bound(x: np.ndarray, fmt) -> np.ndarray:
    """Per-weight bound of |x - dequantize(quantize(x))| for a format, from its definition."""
    b = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(b).max(axis=1, keepdims=True)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    if fmt is Q8_0:  # d = amax/127; rounding costs d/2, the f16 scale up to 127 times its rounding
        d = amax / 127
        bound = d / 2 + 127 * f16_error(d)
    elif fmt is Q4_0:  # d = amax/8; the far side clamps at +7 (vs 8): up to one step d
        d = amax / 8
        bound = d + 8 * f16_error(d)
    elif fmt is Q5_0:  # as Q4_0 with 16 levels a side
        d = amax / 16
        bound = d + 16 * f16_error(d)
    else:  # Q4_1 / Q5_1: d = (hi - lo)/L, trunc(+0.5) rounds: d/2; f16 scale and offset m
        levels = 15 if fmt is Q4_1 else 31
        d = (hi - lo) / levels
        bound = d / 2 + levels * f16_error(d) + f16_error(lo)
    return np.broadcast_to(bound * (1 + 1e-6) + 1e-30, b.shape).reshape(x.shape)


@pytest.mark.parametrize("fmt", [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1], ids=lambda f: f.name)
@given(x=weights())
def test_round_trip_error_within_format_bound(fmt, x: np.ndarray) -> None:
    err = np.abs(dequantize(quantize(x, fmt), fmt).astype(np.float64) - x)
    assert np.all(err <= _block_bound(x, fmt))


def test_round_trip_bound_is_tight_enough_to_fail() -> None:
    # A dequantiser that drops the block scale's f16 rounding would still pass; one that
    # confuses the nibble order (weights j and j + 16) must not.
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    for fmt in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1):
        y = dequantize(quantize(x, fmt), fmt)
        swapped = np.concatenate([y[:, 16:32], y[:, 0:16], y[:, 48:64], y[:, 32:48]], axis=1)
        assert not np.all(np.abs(swapped - x) <= _block_bound(x, fmt))


@pytest.mark.parametrize("fmt, rel", [(F32, 0.0), (F16, 2.0**-11), (BF16, 2.0**-8)])
@given(x=weights(block=1))
def test_float_formats_round_to_nearest(fmt, rel: float, x: np.ndarray) -> None:
    x = np.clip(x, -6e4, 6e4) if fmt is F16 else x  # float16 overflows at 65504
    y = dequantize(quantize(x, fmt), fmt)
    tiny = 2.0**-24 if fmt is F16 else 0.0  # float16 subnormal spacing
    assert np.all(np.abs(y - x) <= rel * np.abs(x) + tiny)


def test_q8_0_rounds_half_away_from_zero() -> None:
    # 0.5 * d and -2.5 * d round to 1 and -3, as C's roundf (numpy's round would give 0, -2)
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127.0, 0.5, -2.5, 1.5]
    q = quantize(x, Q8_0)[0, 2:6].view(np.int8)
    np.testing.assert_array_equal(q, [127, 1, -3, 2])


def test_q4_nibble_order() -> None:
    # byte j holds weight j in its low nibble and weight j + 16 in its high nibble
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 16] = 1.0, -8.0  # d = 1 for Q4_0: q = x + 8
    raw = quantize(x, Q4_0)
    assert raw[0, 2] == (9 | (0 << 4))


def test_row_not_multiple_of_block_is_an_error() -> None:
    with pytest.raises(UnsupportedFormatError, match="multiple of its block size 32"):
        quantize(np.zeros((2, 48), np.float32), Q8_0)
