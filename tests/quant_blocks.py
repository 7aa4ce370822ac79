"""Random raw blocks of any quantised format, for the dequantiser and kernel tests.

Quantisers exist here only for some formats (K-quants are made by llama.cpp), so
the tests draw the stored bytes themselves: every field random, its f16 scales
finite and spread over many binades (`quant.Format.fields` says where they are),
and, on request, the blocks that break careless decoders: all-zero blocks and
blocks whose quant bytes are all 0x00 or all 0xFF (the extreme nibbles and bits).
"""

from __future__ import annotations

import numpy as np

from refinfer.quant import Format, dequantize


def random_f16(rng: np.random.Generator, shape, lo: int = -14, hi: int = 4) -> np.ndarray:
    """uint8[*shape, 2]: finite float16 scales, sign random, magnitude 2^lo .. 2^hi."""
    v = rng.uniform(0.5, 1.0, shape) * np.exp2(rng.integers(lo, hi, shape))
    v *= rng.choice([-1.0, 1.0], shape)
    return v.astype(np.float16)[..., None].view(np.uint8)


def random_blocks(fmt: Format, n_blocks: int, seed: int, extremes: bool = True) -> np.ndarray:
    """uint8[n_blocks, type_size]: random blocks of `fmt` with finite f16 fields.

    With `extremes`, block 0 is all zero, and (if there are more blocks) block 1 has
    every quant byte 0xFF and block 2 every quant byte 0x00 (its scales kept).
    """
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    quant_bytes = np.ones(fmt.type_size, bool)
    for name, kind, _ in fmt.fields:
        o = fmt.offset(name)
        if kind == "f16":
            b[:, o : o + 2] = random_f16(rng, n_blocks)
            quant_bytes[o : o + 2] = False
    if extremes:
        b[:1] = 0
        for row, value in ((1, 0xFF), (2, 0x00)):
            if row < n_blocks:
                b[row, quant_bytes] = value
    return b


def random_rows(fmt: Format, n: int, k: int, seed: int) -> np.ndarray:
    """uint8[n, row_bytes(k)]: a weight matrix of random blocks (no special blocks)."""
    blocks = random_blocks(fmt, n * (k // fmt.block_size), seed, extremes=False)
    return blocks.reshape(n, fmt.row_bytes(k))


def random_rows_with_rms(fmt: Format, n: int, k: int, rms: float, seed: int) -> np.ndarray:
    """uint8[n, row_bytes(k)]: random blocks whose weights have about the given RMS.

    For a model file (tests/gguf_factory.py) in a format refinfer cannot write: every f16
    field (d, dmin, m) of every block is set to one value c, and since each weight is
    c * (integer expression of the other fields), c = rms / RMS(weights at c = 1).
    """
    raw = random_rows(fmt, n, k, seed)
    blocks = raw.reshape(-1, fmt.type_size)
    f16 = [fmt.offset(name) for name, kind, _ in fmt.fields if kind == "f16"]

    def set_scales(c: float) -> None:
        for o in f16:
            blocks[:, o : o + 2] = np.full((len(blocks), 1), c, np.float16).view(np.uint8)

    set_scales(1.0)
    at_one = float(np.sqrt(np.mean(np.square(dequantize(raw, fmt), dtype=np.float64))))
    set_scales(rms / at_one)
    return raw
