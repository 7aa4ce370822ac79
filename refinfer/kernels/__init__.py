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

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from refinfer import quant
from refinfer.errors import UnsupportedFormatError
from refinfer.ggml.dot import round_activations
from refinfer.ggml.ops import HOST
from refinfer.ggml.quantize import ACTIVATION_TYPE
from refinfer.kernels import matmul as _mm
from refinfer.kernels import matmul_blocks as _mb
from refinfer.kernels import matmul_int8 as _mi
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

# numerics="ggml": format name -> int8 kernel (matmul_int8.py), run on the activations
# quantised to the format's ACTIVATION_TYPE; the float formats keep their kernels above and
# take x rounded to their own type (ggml/dot.round_activations)
# (each with the arithmetic of the kernel llama.cpp's build for this host runs: ggml/dot.py)
_MATMUL_INT8 = {name: _mi.kernel(name, HOST) for name in ACTIVATION_TYPE}


MAX_FUSED = 3  # matrices per Linear (Wq, Wk, Wv)
_NO_OUTPUT = np.empty((0, 0), np.float32)  # the output of a padding matrix (never written)


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of a."""
    view = a.view()
    view.flags.writeable = False
    return view


class Linear:
    """y_i = x @ W_i^T for one or more weight matrices W_i[N_i, K] that share the input x.

    Matrices of one format are multiplied in ONE kernel call, one parallel region over all
    their rows (Wq, Wk, Wv of a layer; or Wgate, Wup): a decode step is mostly launches of
    small products, so fewer, larger ones cost less. Everything is checked and the raw
    views are made once, here; a call only dispatches the kernels. Each output is bitwise
    what `matmul` gives for its matrix alone (a row's arithmetic does not depend on the
    others). Raises UnsupportedFormatError for a format no kernel reads.
    """

    def __init__(self, *ws: QTensor, numerics: str = "exact"):
        if not 1 <= len(ws) <= MAX_FUSED:
            raise ValueError(f"Linear takes 1 to {MAX_FUSED} matrices, not {len(ws)}")
        k = ws[0].shape[-1]
        by_format: dict[str, list[int]] = {}  # format -> indices of its matrices in ws
        for i, w in enumerate(ws):
            if w.format.name not in _MATMUL:
                raise UnsupportedFormatError(
                    f"no matmul kernel for tensor {w.name!r} of type {w.format.name} "
                    f"(supported: {', '.join(_MATMUL)})"
                )
            n, kw = w.shape if len(w.shape) == 2 else (0, -1)
            if kw != k or w.data.shape[:1] != (n,) or w.data.nbytes != n * w.format.row_bytes(k):
                raise ValueError(f"{w.name!r}: data {list(w.data.shape)} is not {w.format.name}"
                                 f"[N, {k}] (shape {list(w.shape)})")  # fmt: skip
            by_format.setdefault(w.format.name, []).append(i)
        self.shapes = [w.shape for w in ws]  # (N_i, K)
        # (kernel, x -> its input, raws, table, indices of the matrices in ws)
        self._calls = []
        for name, indices in by_format.items():
            kernel, raw_dtype, table = _MATMUL[name]
            prepare = _exact_input
            if numerics == "ggml":
                fmt = quant.FORMATS[name]
                if name in _MATMUL_INT8:
                    kernel, prepare = _MATMUL_INT8[name], _quantizer(ACTIVATION_TYPE[name])
                elif fmt is not quant.F32:
                    prepare = _rounder(fmt)
            raws = [np.ascontiguousarray(ws[i].data).view(raw_dtype) for i in indices]
            # padded with empty matrices to a fixed count, all read-only (as the memory map
            # is): one type of argument, so one compiled kernel per format
            raws += [np.empty((0, raws[0].shape[1]), raw_dtype)] * (MAX_FUSED - len(raws))
            raws = tuple(_read_only(r) for r in raws)
            self._calls.append((kernel, prepare, raws, table, tuple(indices)))

    def __call__(self, x: np.ndarray, *outs: np.ndarray) -> None:
        """outs[i][T, N_i] = x[T, K] @ W_i^T (all C-contiguous float32)."""
        inputs = {}  # x as each kind of input needs it: quantised once per activation type
        for kernel, prepare, raws, table, indices in self._calls:
            if prepare not in inputs:
                inputs[prepare] = prepare(x)
            ys = tuple(outs[i] for i in indices)
            kernel(inputs[prepare], raws, table, ys + (_NO_OUTPUT,) * (MAX_FUSED - len(ys)))


def _exact_input(x: np.ndarray) -> np.ndarray:
    """x as the float kernels take it (numerics="exact", and F32 weights in either mode)."""
    return x


@functools.cache
def _quantizer(act: str):
    """x -> its `act` blocks (Q8_0, Q8_1 or Q8_K), as the int8 kernels take them."""
    return lambda x: _mi.quantize_activations(x, act)


@functools.cache
def _rounder(fmt: quant.Format):
    """x -> x rounded to F16 or BF16, as ggml multiplies it by weights of that format."""
    return lambda x: round_activations(x, fmt)


def matmul(x: np.ndarray, w: QTensor, out: np.ndarray | None = None) -> np.ndarray:
    """y[T, N] = x[T, K] @ W[N, K]^T for float32 x and a QTensor w of shape (N, K).

    `x` is converted to C-contiguous float32 if it is not already. `out`, if
    given, must be a C-contiguous float32[T, N] array; it is filled and
    returned. Raises UnsupportedFormatError for a format no kernel reads, and
    ValueError for mismatched shapes (a programming error, not bad input).
    """
    linear = Linear(w)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = linear.shapes[0]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(
            f"matmul needs x[T, K] and W[N, K]; got x{list(x.shape)} and {w.name!r}{list(w.shape)}"
        )
    if out is None:
        out = np.empty((x.shape[0], n), dtype=np.float32)
    elif out.shape != (x.shape[0], n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be C-contiguous float32{[x.shape[0], n]}; got {out.dtype}{list(out.shape)}"
        )
    linear(x, out)
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
