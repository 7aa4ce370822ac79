"""Quantisation formats: how a GGUF file stores a row of weights, and the NumPy
reference that reads and writes it.

A weight matrix W[N, K] is stored row by row; each row of K weights is cut into
blocks of `block_size` weights, and each block is `type_size` bytes. This module
describes every supported format as data (`Format`), wraps raw rows in a
`QTensor`, and states each format's math in plain NumPy:
`dequantize(raw, fmt)` and `quantize(w, fmt)`. The Numba kernels in
`refinfer/kernels/` read the same bytes; the tests hold them to this file, and
hold this file to `gguf.quants` (an independent implementation) bit for bit.

Three families, as in ggml (`ggml-common.h` names every field used here):
- 32-weight blocks with one f16 scale `d` (and an offset `m` for the `_1` types):
  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, and IQ4_NL (4-bit indices into a non-linear table);
- 256-weight super-blocks ("K-quants") of 8 or 16 sub-blocks, each with its own
  small integer scale (and min), themselves scaled by the super-block's f16 `d`
  (and `dmin`): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, and IQ4_XS;
- the float formats F32, F16, BF16 (a "block" of one weight).
A model file mixes them per tensor (a Q4_K_M file holds Q4_K, Q6_K, Q5_0, Q8_0
and F32 tensors), so everything dispatches on each tensor's own type.

Data flow: gguf.py wraps each tensor of the file in a QTensor (no copy);
kernels.matmul multiplies by it; `refinfer quantize` calls `quantize` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from refinfer.errors import UnsupportedFormatError

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class Format:
    """One GGUF tensor type: `block_size` weights stored in one block of `fields`.

    `fields` lists the block's members in storage order as (name, type, bytes), named as
    in ggml's ggml-common.h: `d` / `dmin` f16 scales, `m` an f16 offset, `qs` / `ql` the
    low bits of the quants, `qh` / `hmask` their high bits, `scales` packed sub-block scales.
    """

    name: str  # as on the command line: 'q8_0'
    ggml_type: GGMLQuantizationType
    block_size: int  # weights per block (1 for the float formats)
    fields: tuple[tuple[str, str, int], ...]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return sum(n_bytes for _, _, n_bytes in self.fields)

    def offset(self, field: str) -> int:
        """Byte offset of `field` in a block."""
        names = [name for name, _, _ in self.fields]
        return sum(n for _, _, n in self.fields[: names.index(field)])

    @property
    def bits_per_weight(self) -> float:
        """Storage cost: 8 * type_size / block_size (4.5 for Q4_0 and for Q4_K)."""
        return 8 * self.type_size / self.block_size

    def row_bytes(self, k: int) -> int:
        """Bytes that one row of `k` weights occupies."""
        if k % self.block_size:
            raise UnsupportedFormatError(
                f"a row of {k} weights cannot be stored as {self.name}: "
                f"{k} is not a multiple of its block size {self.block_size}"
            )
        return k // self.block_size * self.type_size


_T = GGMLQuantizationType
_D, _DMIN, _M = ("d", "f16", 2), ("dmin", "f16", 2), ("m", "f16", 2)
_QH = ("qh", "u8", 4)  # Q5_0 / Q5_1: bit 4 of each of the 32 weights, a little-endian uint32
F32 = Format("f32", _T.F32, 1, (("w", "f32", 4),))
F16 = Format("f16", _T.F16, 1, (("w", "f16", 2),))
BF16 = Format("bf16", _T.BF16, 1, (("w", "bf16", 2),))
Q8_0 = Format("q8_0", _T.Q8_0, 32, (_D, ("qs", "i8", 32)))
Q4_0 = Format("q4_0", _T.Q4_0, 32, (_D, ("qs", "u8", 16)))
Q4_1 = Format("q4_1", _T.Q4_1, 32, (_D, _M, ("qs", "u8", 16)))
Q5_0 = Format("q5_0", _T.Q5_0, 32, (_D, _QH, ("qs", "u8", 16)))
Q5_1 = Format("q5_1", _T.Q5_1, 32, (_D, _M, _QH, ("qs", "u8", 16)))
IQ4_NL = Format("iq4_nl", _T.IQ4_NL, 32, (_D, ("qs", "u8", 16)))
Q2_K = Format("q2_k", _T.Q2_K, QK_K, (("scales", "u8", 16), ("qs", "u8", 64), _D, _DMIN))
Q3_K = Format(
    "q3_k", _T.Q3_K, QK_K, (("hmask", "u8", 32), ("qs", "u8", 64), ("scales", "u8", 12), _D)
)
Q4_K = Format("q4_k", _T.Q4_K, QK_K, (_D, _DMIN, ("scales", "u8", 12), ("qs", "u8", 128)))
Q5_K = Format("q5_k", _T.Q5_K, QK_K,
              (_D, _DMIN, ("scales", "u8", 12), ("qh", "u8", 32), ("qs", "u8", 128)))  # fmt: skip
Q6_K = Format(
    "q6_k", _T.Q6_K, QK_K, (("ql", "u8", 128), ("qh", "u8", 64), ("scales", "i8", 16), _D)
)
IQ4_XS = Format("iq4_xs", _T.IQ4_XS, QK_K,
                (_D, ("scales_h", "u16", 2), ("scales_l", "u8", 4), ("qs", "u8", 128)))  # fmt: skip

FORMATS = {
    f.name: f
    for f in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
              Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)
}  # fmt: skip
_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}

# IQ4_NL / IQ4_XS: a 4-bit index selects one of 16 non-uniform levels (ggml's kvalues_iq4nl),
# denser near zero, where most weights are.
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)


def format_of(ggml_type: GGMLQuantizationType, tensor: str | None = None) -> Format:
    """The Format for a GGUF tensor type, or UnsupportedFormatError naming `tensor`."""
    try:
        return _BY_GGML_TYPE[ggml_type]
    except KeyError:
        supported = ", ".join(f.name.upper() for f in FORMATS.values())
        which = f"tensor {tensor} has type" if tensor else "tensor type"
        raise UnsupportedFormatError(
            f"{which} {ggml_type.name}, which refinfer does not read (supported: {supported}); "
            f"requantise the model from an F32/F16 file, e.g. with `refinfer quantize --type "
            f"q8_0` or llama.cpp's `llama-quantize IN.gguf OUT.gguf Q4_K_M`"
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

    def rows(self, start: int, stop: int) -> QTensor:
        """Rows start .. stop - 1 of a matrix, as a view (rows are whole blocks in GGUF)."""
        return QTensor(
            f"{self.name}[{start}:{stop}]", self.format, (stop - start, *self.shape[1:]),
            self.data[start:stop],
        )  # fmt: skip


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


def _bits(qh: np.ndarray) -> np.ndarray:
    """uint8[n, 4] little-endian uint32 -> uint8[n, 32]: bit j of the word is entry j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _planes(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8[n, B] -> uint8[n, 8 // bits, B]: plane p holds bits p*bits .. p*bits+bits-1."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]  # (planes, 1)
    return (q[:, None, :] >> shifts) & np.uint8((1 << bits) - 1)


def _per_weight(scale: np.ndarray, n: int) -> np.ndarray:
    """float32[n_blocks, S] sub-block values -> float32[n_blocks, S * n]: each repeated n times."""
    return np.repeat(scale, n, axis=-1)


# ---- dequantisation: raw blocks -> float32 ---------------------------------
# One function per format, each mirroring ggml-quants.c's dequantize_row_<type>;
# the order of the float operations is ggml's, so the float32 results are bit-exact.


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


def _dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    # block_q5_0 (22 bytes): | d: f16 | qh: uint32, bit j = 5th bit of weight j | qs: uint8[16] |
    # q[j] = (qs[j] & 0xF) | bit j of qh << 4,  q[j + 16] = (qs[j] >> 4) | bit j+16 << 4
    # w = d * (q - 16)
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6]) << 4)
    return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


def _dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    # block_q5_1 (24 bytes): | d: f16 | m: f16 | qh: uint32 | qs: uint8[16] |   (q as in q5_0)
    # w = d * q + m
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8]) << 4)
    return d * q.astype(np.float32) + m


def _dequantize_iq4_nl(b: np.ndarray) -> np.ndarray:
    # block_iq4_nl (18 bytes): | d: f16 | qs: uint8[16], packed as q4_0 |
    # w = d * kvalues_iq4nl[q]
    d = _f16(b[:, 0:2])
    return d * KVALUES_IQ4NL[_nibbles(b[:, 2:18])].astype(np.float32)


def _dequantize_q2_k(b: np.ndarray) -> np.ndarray:
    # block_q2_K (84 bytes): | scales: uint8[16] | qs: uint8[64] | d: f16 | dmin: f16 |
    # 16 sub-blocks of 16 weights; scales[i] = m_i << 4 | sc_i (4 bits each).
    # Weight 128 h + 32 s + l (h = 0..1, s = 0..3, l = 0..31) is 2 bits of one byte:
    #   q = (qs[32 h + l] >> 2 s) & 3
    # w = (d * sc_i) * q - (dmin * m_i),  i = weight // 16
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = d * (scales & 0xF).astype(np.float32)  # (n, 16)
    ml = dmin * (scales >> 4).astype(np.float32)
    q = _planes(qs.reshape(-1, 32), 2)  # (n * 2, 4, 32): [h][s][l]
    q = q.reshape(-1, QK_K).astype(np.float32)
    return _per_weight(dl, 16) * q - _per_weight(ml, 16)


def _q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """uint8[n, 12] -> int8[n, 16]: the 6-bit signed sub-block scales of block_q3_K.

    Scale i: low 4 bits in byte i % 8 (low nibble for i < 8, high for i >= 8),
    high 2 bits in byte 8 + i % 4 at bits 2 (i // 4); stored with an offset of 32.
        0: IIIIAAAA   ...   7: PPPPHHHH   8: MMIIEEAA   9: NNJJFFBB  10: OOKKGGCC  11: PPLLHHDD
    """
    low = np.concatenate([scales[:, 0:8] & 0xF, scales[:, 0:8] >> 4], axis=-1)  # (n, 16)
    high = _planes(scales[:, 8:12], 2).reshape(-1, 16)  # plane i // 4, byte i % 4
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _dequantize_q3_k(b: np.ndarray) -> np.ndarray:
    # block_q3_K (110 bytes): | hmask: uint8[32] | qs: uint8[64] | scales: uint8[12] | d: f16 |
    # 16 sub-blocks of 16 weights. Weight 128 h + 32 s + l (h = 0..1, s = 0..3, l = 0..31):
    #   low 2 bits  (qs[32 h + l] >> 2 s) & 3,   high bit  (hmask[l] >> (4 h + s)) & 1
    #   q = low - (0 if high bit set else 4)   (the high bit *clears* an offset of -4)
    # w = (d * (scale_i)) * q,  i = weight // 16
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    dl = d * _q3_k_scales(scales).astype(np.float32)  # (n, 16)
    low = _planes(qs.reshape(-1, 32), 2).reshape(-1, QK_K)  # [h][s][l]
    high = _planes(hmask, 1).reshape(-1, QK_K)  # plane 4 h + s, byte l: the same order
    q = low.astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)
    return _per_weight(dl, 16) * q.astype(np.float32)


def _k4_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[n, 12] -> (sc, m), uint8[n, 8] each: the 6-bit sub-block scales and mins of
    block_q4_K / block_q5_K (ggml's get_scale_min_k4).

        0: EEAAAAAA  1: FFBBBBBB  2: GGCCCCCC  3: HHDDDDDD      A-D: sc 0-3, E-H: top of sc 4-7
        4: eeaaaaaa  5: ffbbbbbb  6: ggcccccc  7: hhdddddd      a-d: m 0-3,  e-h: top of m 4-7
        8: eeeeEEEE  9: ffffFFFF 10: ggggGGGG 11: hhhhHHHH      low 4 bits of sc / m 4-7
    """
    sc_lo, m_lo, mixed = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([sc_lo & 0x3F, (mixed & 0xF) | ((sc_lo >> 6) << 4)], axis=-1)
    m = np.concatenate([m_lo & 0x3F, (mixed >> 4) | ((m_lo >> 6) << 4)], axis=-1)
    return sc, m


def _dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    # block_q4_K (144 bytes): | d: f16 | dmin: f16 | scales: uint8[12] | qs: uint8[128] |
    # 8 sub-blocks of 32 weights. Sub-blocks 2c and 2c + 1 share qs[32 c : 32 c + 32]:
    #   weight 64 c + l = qs[32 c + l] & 0xF,  weight 64 c + 32 + l = qs[32 c + l] >> 4
    # w = (d * sc_i) * q - (dmin * m_i),  i = weight // 32
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k4_scales_mins(b[:, 4:16])
    q = _planes(b[:, 16:144].reshape(-1, 32), 4).reshape(-1, QK_K)  # [c][nibble][l]
    dl = _per_weight(d * sc.astype(np.float32), 32)
    ml = _per_weight(dmin * m.astype(np.float32), 32)
    return dl * q.astype(np.float32) - ml


def _dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    # block_q5_K (176 bytes): | d | dmin | scales: uint8[12] | qh: uint8[32] | qs: uint8[128] |
    # as q4_K, plus a 5th bit: sub-block i, weight l has bit i of qh[l] as its bit 4
    # w = (d * sc_i) * q - (dmin * m_i)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k4_scales_mins(b[:, 4:16])
    low = _planes(b[:, 48:176].reshape(-1, 32), 4).reshape(-1, QK_K)
    high = _planes(b[:, 16:48], 1).reshape(-1, QK_K)  # plane i, byte l
    q = low | (high << 4)
    dl = _per_weight(d * sc.astype(np.float32), 32)
    ml = _per_weight(dmin * m.astype(np.float32), 32)
    return dl * q.astype(np.float32) - ml


def _dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    # block_q6_K (210 bytes): | ql: uint8[128] | qh: uint8[64] | scales: int8[16] | d: f16 |
    # 16 sub-blocks of 16 weights. Weight 128 h + 32 s + l (h = 0..1, s = 0..3, l = 0..31):
    #   low 4 bits  (ql[64 h + 32 (s % 2) + l] >> 4 (s // 2)) & 0xF
    #   high 2 bits (qh[32 h + l] >> 2 s) & 3
    # w = (d * scales_i) * (q - 32),  i = weight // 16
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].view(np.int8)
    d = _f16(b[:, 208:210])
    low = _planes(ql.reshape(-1, 64), 4).reshape(-1, QK_K)  # [h][s // 2][s % 2][l]
    high = _planes(qh.reshape(-1, 32), 2).reshape(-1, QK_K)  # [h][s][l]
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return _per_weight(d * scales.astype(np.float32), 16) * q.astype(np.float32)


def _dequantize_iq4_xs(b: np.ndarray) -> np.ndarray:
    # block_iq4_xs (136 bytes): | d: f16 | scales_h: uint16 | scales_l: uint8[4] | qs: uint8[128] |
    # 8 sub-blocks of 32 weights, each packed as q4_0 in qs[16 i : 16 i + 16].
    # 6-bit scale i: low 4 bits = nibble i % 2 of scales_l[i // 2], high 2 = bits 2i of scales_h
    # w = (d * (scale_i - 32)) * kvalues_iq4nl[q]
    d = _f16(b[:, 0:2])
    high = _planes(b[:, 2:4], 2).transpose(0, 2, 1).reshape(-1, 8)  # byte i // 4, plane i % 4
    low = np.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], axis=-1).reshape(-1, 8)
    ls = (low | (high << 4)).astype(np.int8) - np.int8(32)
    q = _nibbles(b[:, 8:136].reshape(-1, 16)).reshape(-1, QK_K)
    dl = _per_weight(d * ls.astype(np.float32), 32)
    return dl * KVALUES_IQ4NL[q].astype(np.float32)


_DEQUANTIZE = {
    Q8_0: _dequantize_q8_0, Q4_0: _dequantize_q4_0, Q4_1: _dequantize_q4_1,
    Q5_0: _dequantize_q5_0, Q5_1: _dequantize_q5_1, IQ4_NL: _dequantize_iq4_nl,
    Q2_K: _dequantize_q2_k, Q3_K: _dequantize_q3_k, Q4_K: _dequantize_q4_k,
    Q5_K: _dequantize_q5_k, Q6_K: _dequantize_q6_k, IQ4_XS: _dequantize_iq4_xs,
}  # fmt: skip


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
        w = _DEQUANTIZE[fmt](_blocks(raw, fmt))
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


def _pack_bits(q: np.ndarray) -> np.ndarray:
    """uint8[n, 32] of values 0..31 -> uint8[n, 4]: bit 4 of weight j is bit j of qh."""
    return np.packbits(q >> 4, axis=-1, bitorder="little")


def _quantize_q5_0(x: np.ndarray) -> np.ndarray:
    # d = x[argmax|x|] / -16 (the signed extreme maps to -16);  q = min(31, trunc(x / d + 16.5))
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)
    d = extreme / np.float32(-16)
    q = np.minimum(np.trunc(x * _inverse(d) + np.float32(16.5)).astype(np.uint8), 31)
    return np.concatenate([_to_f16_bytes(d), _pack_bits(q), _pack_nibbles(q & 0xF)], axis=-1)


def _quantize_q5_1(x: np.ndarray) -> np.ndarray:
    # m = min(x), d = (max(x) - m) / 31;  q = min(31, trunc((x - m) / d + 0.5))
    lo = x.min(axis=-1, keepdims=True)
    d = (x.max(axis=-1, keepdims=True) - lo) / np.float32(31)
    q = np.minimum(np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8), 31)
    return np.concatenate(
        [_to_f16_bytes(d), _to_f16_bytes(lo), _pack_bits(q), _pack_nibbles(q & 0xF)], axis=-1
    )


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    # keep the top 16 bits of the float32, rounding to nearest even; NaN stays a quiet NaN
    bits = x.view(np.uint32).astype(np.uint64)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)


_QUANTIZE = {
    "bf16": _quantize_bf16, "q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0,
    "q4_1": _quantize_q4_1, "q5_0": _quantize_q5_0, "q5_1": _quantize_q5_1,
}  # fmt: skip
QUANTIZE_FORMATS = ["f32", "f16", *_QUANTIZE]  # what `refinfer quantize` writes


def check_writable(fmt: Format) -> None:
    """UnsupportedFormatError, saying which tool writes it, unless `quantize` writes `fmt`."""
    if fmt.name not in QUANTIZE_FORMATS:
        raise UnsupportedFormatError(
            f"refinfer reads {fmt.name} but does not write it; make {fmt.name.upper()} files "
            f"with llama.cpp: `llama-quantize MODEL-F32.gguf OUT.gguf {fmt.name.upper()}` "
            f"(refinfer quantize writes {', '.join(QUANTIZE_FORMATS)})"
        )


def quantize(w: np.ndarray, fmt: Format) -> np.ndarray:
    """float32[..., K] -> uint8[..., row_bytes(K)] in format `fmt`.

    K-quants and IQ formats are read, not written: their quantisers search scales
    (and use an importance matrix); llama.cpp's `llama-quantize` makes them.
    """
    check_writable(fmt)
    w = np.ascontiguousarray(w, dtype=np.float32)
    lead, k = w.shape[:-1], w.shape[-1]
    row_bytes = fmt.row_bytes(k)
    blocks = w.reshape(-1, fmt.block_size)
    if fmt is F32:
        raw = blocks.view(np.uint8)
    elif fmt is F16:
        raw = blocks.astype(np.float16).view(np.uint8)
    else:
        raw = _QUANTIZE[fmt.name](blocks)
    return np.ascontiguousarray(raw).reshape(*lead, row_bytes)
