"""Every Numba kernel of refinfer, behind small NumPy-facing entry points.

`matmul(x, w)` multiplies a float32 activation batch x[T, K] by a weight matrix
W[N, K] kept in its storage format (a `QTensor`: raw GGUF blocks, usually a
view into the memory-mapped file): y[T, N] = x @ W^T. The kernels
(`matmul_blocks.py` for every block format, Q8_0 .. Q6_K and IQ4, `matmul.py`
for F32/F16/BF16)
dequantise on the fly, so W is never expanded to float32 in memory, and a
batch of T tokens streams W from memory once.

The contract the tests hold (tests/test_kernels.py):
- the weights used are exactly `quant.dequantize(w)` as float32;
- each y[t, n] is reduced in one fixed order (lanes over k, then a fixed tree;
  8 FMA lanes in matmul_blocks.py, 32 lanes in matmul.py), so results are
  bitwise identical whatever T, whatever the other tokens in the batch and
  whatever the thread count;
- y agrees with the float64 product within float32 rounding of K products.

Kernels are compiled on first use and cached on disk (`cache=True`); set
NUMBA_CACHE_DIR to move the cache, NUMBA_NUM_THREADS to limit the threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from refinfer import quant
from refinfer.errors import UnsupportedFormatError
from refinfer.kernels import matmul as _mm
from refinfer.kernels import matmul_blocks as _mb
from refinfer.quant import QTensor

# format name -> (kernel, dtype the raw bytes are viewed as, lookup table); a tensor's
# own format picks its kernel, so a file mixing Q4_K, Q6_K, Q5_0 and Q8_0 needs nothing else
_MATMUL = {
    "f32": (_mm.matmul_f32, np.float32, quant.F16_TO_F32),  # table unused
    "f16": (_mm.matmul_16bit, np.uint16, quant.F16_TO_F32),
    "bf16": (_mm.matmul_16bit, np.uint16, quant.BF16_TO_F32),
    "q8_0": (_mb.matmul_q8_0, np.uint8, quant.F16_TO_F32),
    "q4_0": (_mb.matmul_q4_0, np.uint8, quant.F16_TO_F32),
    "q4_1": (_mb.matmul_q4_1, np.uint8, quant.F16_TO_F32),
    "q5_0": (_mb.matmul_q5_0, np.uint8, quant.F16_TO_F32),
    "q5_1": (_mb.matmul_q5_1, np.uint8, quant.F16_TO_F32),
    "iq4_nl": (_mb.matmul_iq4_nl, np.uint8, quant.F16_TO_F32),
    "q2_k": (_mb.matmul_q2_k, np.uint8, quant.F16_TO_F32),
    "q3_k": (_mb.matmul_q3_k, np.uint8, quant.F16_TO_F32),
    "q4_k": (_mb.matmul_q4_k, np.uint8, quant.F16_TO_F32),
    "q5_k": (_mb.matmul_q5_k, np.uint8, quant.F16_TO_F32),
    "q6_k": (_mb.matmul_q6_k, np.uint8, quant.F16_TO_F32),
    "iq4_xs": (_mb.matmul_iq4_xs, np.uint8, quant.F16_TO_F32),
}


def matmul(x: np.ndarray, w: QTensor, out: np.ndarray | None = None) -> np.ndarray:
    """y[T, N] = x[T, K] @ W[N, K]^T for float32 x and a QTensor w of shape (N, K).

    `x` is converted to C-contiguous float32 if it is not already. `out`, if
    given, must be a C-contiguous float32[T, N] array; it is filled and
    returned. Raises UnsupportedFormatError for a format no kernel reads, and
    ValueError for mismatched shapes (a programming error, not bad input).
    """
    try:
        kernel, raw_dtype, table = _MATMUL[w.format.name]
    except KeyError:
        supported = ", ".join(_MATMUL)
        raise UnsupportedFormatError(
            f"no matmul kernel for tensor {w.name!r} of type {w.format.name} "
            f"(supported: {supported})"
        ) from None
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(w.shape) != 2 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"matmul needs x[T, K] and W[N, K]; got x{list(x.shape)} and {w.name!r}{list(w.shape)}"
        )
    n, k = w.shape
    raw = np.ascontiguousarray(w.data).view(raw_dtype)
    if raw.shape != (n, w.format.row_bytes(k) // raw.itemsize):
        raise ValueError(
            f"{w.name!r}: data of shape {list(w.data.shape)} does not hold "
            f"{w.format.name}[{n}, {k}]"
        )
    if out is None:
        out = np.empty((x.shape[0], n), dtype=np.float32)
    elif out.shape != (x.shape[0], n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be C-contiguous float32{[x.shape[0], n]}; got {out.dtype}{list(out.shape)}"
        )
    kernel(x, raw, table, out)
    return out


def compiled_cache_present() -> bool:
    """Whether Numba has cached compiled kernels of this package (else first use compiles)."""
    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    here = Path(__file__).parent
    roots = [Path(cache_dir)] if cache_dir else [here / "__pycache__"]
    return any(any(root.rglob("*.nbi")) for root in roots if root.is_dir())


@contextmanager
def compile_seconds(record) -> Iterator[None]:
    """Call record(seconds) with the time Numba spent compiling kernels inside the block.

    Loading a kernel from the disk cache is not compiling and counts nothing; so on any run
    but the first this records nothing (record is not called).
    """
    from numba.core import event

    with event.install_timer("numba:compile", record):
        yield
