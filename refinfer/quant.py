"""Quantisation formats: how a GGUF file stores a row of weights, and the NumPy
reference that reads and writes it.

A weight matrix W[N, K] is stored row by row; each row of K weights is cut into
blocks of `block_size` weights, and each block is `type_size` bytes. This module
describes every supported format as data (`Format`), wraps raw rows in a
`QTensor`, and states each format's math in plain NumPy:
`dequantize(raw, fmt)` and `quantize(w, fmt)`. The Numba kernels in
`refinfer/kernels/` read the same bytes; the tests hold them to this file, and
hold this file to `gguf.quants` (an independent implementation) bit for bit.

Data flow: gguf.py wraps each tensor of the file in a QTensor (no copy);
kernels.matmul multiplies by it; `refinfer quantize` calls `quantize` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from refinfer.errors import UnsupportedFormatError


@dataclass(frozen=True)
class Format:
    """One GGUF tensor type: `block_size` weights are stored in `type_size` bytes."""

    name: str  # as on the command line: 'q8_0'
    ggml_type: GGMLQuantizationType
    block_size: int  # weights per block (1 for the float formats)
    type_size: int  # bytes per block

    def row_bytes(self, k: int) -> int:
        """Bytes that one row of `k` weights occupies."""
        if k % self.block_size:
            raise UnsupportedFormatError(
                f"a row of {k} weights cannot be stored as {self.name}: "
                f"{k} is not a multiple of its block size {self.block_size}"
            )
        return k // self.block_size * self.type_size


F32 = Format("f32", GGMLQuantizationType.F32, 1, 4)
F16 = Format("f16", GGMLQuantizationType.F16, 1, 2)
BF16 = Format("bf16", GGMLQuantizationType.BF16, 1, 2)
Q8_0 = Format("q8_0", GGMLQuantizationType.Q8_0, 32, 2 + 32)
Q4_0 = Format("q4_0", GGMLQuantizationType.Q4_0, 32, 2 + 16)
Q4_1 = Format("q4_1", GGMLQuantizationType.Q4_1, 32, 2 + 2 + 16)

FORMATS = {f.name: f for f in (F32, F16, BF16, Q8_0, Q4_0, Q4_1)}
_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def format_of(ggml_type: GGMLQuantizationType) -> Format:
    """The Format for a GGUF tensor type, or UnsupportedFormatError."""
    try:
        return _BY_GGML_TYPE[ggml_type]
    except KeyError:
        supported = ", ".join(f.name.upper() for f in FORMATS.values())
        raise UnsupportedFormatError(
            f"tensor type {ggml_type.name} is not supported (supported: {supported}); "
            f"requantise the model, e.g. `refinfer quantize IN.gguf OUT.gguf --type q8_0` "
            f"from an F32/F16 file"
        ) from None


@dataclass(frozen=True)
class QTensor:
    """A weight tensor as stored: `data` holds the raw blocks, usually a view into the mmap.

    `shape` is the logical shape in NumPy order, e.g. (N, K) for a matrix with
    N output rows of K inputs; `data` is uint8[*shape[:-1], row_bytes(K)].
    """

    name: str
    format: Format
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of raw blocks (what a matrix-vector product streams from memory)."""
        return self.data.nbytes

    @property
    def n_elements(self) -> int:
        """Number of weights."""
        return int(np.prod(self.shape))

    def dequantize(self) -> np.ndarray:
        """The weights as float32[*shape] (a new array; for tests, reference and readers)."""
        return dequantize(self.data, self.format)


# The 65536 float16 and bfloat16 bit patterns as float32. Numba has no float16
# type, so the kernels convert a 16-bit scale or weight with one lookup (as
# ggml's ggml_table_f32_f16 does); tables of 256 KiB each.
_ALL_U16 = np.arange(1 << 16, dtype=np.uint32)
F16_TO_F32 = _ALL_U16.astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TO_F32 = (_ALL_U16 << 16).view(np.float32)


def _blocks(raw: np.ndarray, fmt: Format) -> np.ndarray:
    """uint8[..., row_bytes] -> uint8[n_blocks, type_size]."""
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, fmt.type_size)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """uint8[n, 2] little-endian float16 -> float32[n, 1]."""
    return two_bytes.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8[n, 16] -> uint8[n, 32]: the low nibbles are weights 0..15, the high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# ---- dequantisation: raw blocks -> float32 ---------------------------------


def _dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    # block_q8_0 (34 bytes): | d: f16 | qs: int8[32] |     w[j] = d * qs[j]
    d = _f16(b[:, 0:2])
    qs = b[:, 2:34].view(np.int8).astype(np.float32)
    return d * qs


def _dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    # block_q4_0 (18 bytes): | d: f16 | qs: uint8[16], two 4-bit weights each |
    # w[j] = d * ((qs[j] & 0xF) - 8),  w[j + 16] = d * ((qs[j] >> 4) - 8)
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:18]).astype(np.float32) - np.float32(8)
    return d * q


def _dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    # block_q4_1 (20 bytes): | d: f16 | m: f16 | qs: uint8[16] |
    # w[j] = d * (qs[j] & 0xF) + m,  w[j + 16] = d * (qs[j] >> 4) + m
    d = _f16(b[:, 0:2])
    m = _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:20]).astype(np.float32)
    return d * q + m


def dequantize(raw: np.ndarray, fmt: Format) -> np.ndarray:
    """uint8[..., row_bytes] in format `fmt` -> float32[..., K]."""
    raw = np.asarray(raw)
    row_bytes = raw.shape[-1]
    k = row_bytes // fmt.type_size * fmt.block_size
    lead = raw.shape[:-1]
    if fmt is F32:
        w = _blocks(raw, fmt).view(np.float32)
    elif fmt is F16:
        w = _blocks(raw, fmt).view(np.float16).astype(np.float32)
    elif fmt is BF16:
        w = BF16_TO_F32[_blocks(raw, fmt).view(np.uint16)]
    else:
        w = {Q8_0: _dequantize_q8_0, Q4_0: _dequantize_q4_0, Q4_1: _dequantize_q4_1}[fmt](
            _blocks(raw, fmt)
        )
    return w.reshape(*lead, k)


# ---- quantisation: float32 -> raw blocks (as ggml-quants.c's *_ref functions) ----


def _to_f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32[n, 1] -> uint8[n, 2]."""
    return v.astype(np.float16).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d, with 0 where d == 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8[n, 32] of values 0..15 -> uint8[n, 16]: weight j low, weight j + 16 high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero (np.round would go to even)."""
    # float32 + 0.5 can round up before the floor; float64 holds it exactly.
    return np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    # d = max|x| / 127;  qs = roundf(x / d)
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    qs = _round_half_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_to_f16_bytes(d), qs], axis=-1)


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    # d = x[argmax|x|] / -8 (the signed extreme maps to -8);  q = min(15, trunc(x / d + 8.5))
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)
    d = extreme / np.float32(-8)
    q = np.trunc(x * _inverse(d) + np.float32(8.5)).astype(np.uint8)
    return np.concatenate([_to_f16_bytes(d), _pack_nibbles(np.minimum(q, 15))], axis=-1)


def _quantize_q4_1(x: np.ndarray) -> np.ndarray:
    # m = min(x), d = (max(x) - m) / 15;  q = min(15, trunc((x - m) / d + 0.5))
    lo = x.min(axis=-1, keepdims=True)
    d = (x.max(axis=-1, keepdims=True) - lo) / np.float32(15)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8)
    return np.concatenate(
        [_to_f16_bytes(d), _to_f16_bytes(lo), _pack_nibbles(np.minimum(q, 15))], axis=-1
    )


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    # keep the top 16 bits of the float32, rounding to nearest even; NaN stays a quiet NaN
    bits = x.view(np.uint32).astype(np.uint64)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)


def quantize(w: np.ndarray, fmt: Format) -> np.ndarray:
    """float32[..., K] -> uint8[..., row_bytes(K)] in format `fmt`."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    lead, k = w.shape[:-1], w.shape[-1]
    row_bytes = fmt.row_bytes(k)
    blocks = w.reshape(-1, fmt.block_size)
    if fmt is F32:
        raw = blocks.view(np.uint8)
    elif fmt is F16:
        raw = blocks.astype(np.float16).view(np.uint8)
    else:
        raw = {
            BF16: _quantize_bf16,
            Q8_0: _quantize_q8_0,
            Q4_0: _quantize_q4_0,
            Q4_1: _quantize_q4_1,
        }[fmt](blocks)
    return np.ascontiguousarray(raw).reshape(*lead, row_bytes)
