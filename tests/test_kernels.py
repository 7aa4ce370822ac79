"""kernels.matmul against its NumPy twin (quant.dequantize, then a float64 product).

What is held, for every format:
- the weights the kernel multiplies by are exactly quant.dequantize's float32 weights;
- y is within the float32 rounding bound of its fixed reduction order (see `_bound`);
- y[t] is bitwise the same whatever T, whatever the other tokens, whatever the
  thread count (invariant 4 of DESIGN.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from quant_blocks import random_rows
from refinfer import kernels, quant
from refinfer.errors import UnsupportedFormatError
from refinfer.quant import QTensor

FORMATS = list(quant.FORMATS)
FLOAT_FORMATS = [name for name, f in quant.FORMATS.items() if f.block_size == 1]
U32 = 2.0**-24  # unit roundoff of float32
BLOCK_FORMATS = [name for name, f in quant.FORMATS.items() if f.block_size > 1]


def _qtensor(fmt: str, n: int, k: int, seed: int) -> QTensor:
    """A random (N, K) weight matrix stored in `fmt`, rows at varied scales.

    Formats refinfer can write are quantised from Gaussian weights; the others (K-quants,
    IQ4) are random blocks with finite scales (tests/quant_blocks.py).
    """
    if fmt not in quant.QUANTIZE_FORMATS:
        return QTensor("w", quant.FORMATS[fmt], (n, k), random_rows(quant.FORMATS[fmt], n, k, seed))
    rng = np.random.default_rng(seed)
    scale = np.float32(2.0) ** rng.integers(-4, 4, size=(n, 1)).astype(np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) * scale
    return QTensor("w", quant.FORMATS[fmt], (n, k), quant.quantize(w, quant.FORMATS[fmt]))


def _k(fmt: str, blocks: int) -> int:
    """K of `blocks` 32-weight groups, rounded up to whole blocks of `fmt` (256 for K-quants)."""
    qk = max(32, quant.FORMATS[fmt].block_size)
    return -(-32 * blocks // qk) * qk


def _x(t: int, k: int, seed: int) -> np.ndarray:
    """float32[T, K] random activations."""
    return np.random.default_rng(seed + 1).standard_normal((t, k), dtype=np.float32)


def _roundings(k: int, fmt: str) -> int:
    """The most roundings any product goes through in the kernel's order for `fmt`.

    Float formats (matmul.py): one per product, ceil(K / 32) adds in its lane,
    5 levels of the lane tree. Block formats (matmul_blocks.py): the product and
    its add are one FMA, ceil(K / 8) FMAs in its lane, 3 levels of the lane tree.
    """
    if fmt in BLOCK_FORMATS:
        return -(-k // 8) + 3
    return 1 + -(-k // 32) + 5


def _bound(x: np.ndarray, w: np.ndarray, fmt: str) -> np.ndarray:
    """|y - y_exact| bound for the kernel's order, elementwise over [T, N].

    With m the roundings any product passes through (`_roundings`), Higham
    (Accuracy and Stability, eq. 3.5 / 4.4) gives |error| <= gamma_m *
    sum_k |x[t, k] * w[n, k]|, gamma_m = m u / (1 - m u), u = 2^-24. The float64
    reference adds at most K * 2^-53 * sum|x w| of its own; we allow 2^-52 K.
    This is the worst case of the exact order, not a loose fudge factor (a plain
    sequential float32 sum would need m = K + 1, 8 to 32 times more).
    """
    k = x.shape[1]
    m = _roundings(k, fmt)
    gamma = m * U32 / (1 - m * U32) + k * 2.0**-52
    return gamma * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)


def _check_close(x: np.ndarray, q: QTensor, y: np.ndarray) -> None:
    w = q.dequantize()
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    err = np.abs(y.astype(np.float64) - exact)
    bound = _bound(x, w, q.format.name)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


# ---- kernel == reference -----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 20),
    n=st.integers(1, 40),
    blocks=st.integers(1, 24),  # K = 32 * blocks (a multiple of 256 for K-quants): odd ones too
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_matches_reference(fmt: str, t: int, n: int, blocks: int, seed: int) -> None:
    k = _k(fmt, blocks)
    q, x = _qtensor(fmt, n, k, seed), _x(t, k, seed)
    _check_close(x, q, kernels.matmul(x, q))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 20),
    n=st.integers(1, 40),
    k=st.integers(1, 300),  # any K: tiny test models have K % 32 != 0
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_float_formats_any_k(fmt: str, t: int, n: int, k: int, seed: int) -> None:
    q, x = _qtensor(fmt, n, k, seed), _x(t, k, seed)
    _check_close(x, q, kernels.matmul(x, q))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("blocks", [1, 3, 13])
def test_matmul_uses_exactly_the_dequantized_weights(fmt: str, blocks: int) -> None:
    # x = identity: y[t, n] = w[n, t] * 1 plus products with 0, which is exact,
    # so y == W^T bit for bit iff every decoded weight equals quant.dequantize's.
    k = _k(fmt, blocks)
    q = _qtensor(fmt, 7, k, seed=k)
    y = kernels.matmul(np.eye(k, dtype=np.float32), q)
    np.testing.assert_array_equal(y, q.dequantize().T)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tolerance_catches_one_wrong_weight(fmt: str) -> None:
    # The bound is tight enough to notice one weight off by one quantisation
    # step: change one stored byte (a qs byte, or a float's upper byte) and
    # compare against the reference of the unchanged weights.
    t, n, k = 3, 5, _k(fmt, 3)
    q, x = _qtensor(fmt, n, k, seed=7), _x(t, k, seed=7)
    _check_close(x, q, kernels.matmul(x, q))
    data = q.data.copy()
    data[2, -1] ^= 0x01 if q.format.block_size > 1 else 0x10  # the last weight of row 2
    y_bad = kernels.matmul(x, QTensor("w", q.format, q.shape, data))
    with pytest.raises(AssertionError, match="bound"):
        _check_close(x, q, y_bad)


# ---- determinism -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_is_bitwise_independent_of_the_batch(fmt: str) -> None:
    k = 37 if fmt in FLOAT_FORMATS else _k(fmt, 3)
    q = _qtensor(fmt, 13, k, seed=3)
    x = _x(17, k, seed=3)
    alone = np.concatenate([kernels.matmul(x[i : i + 1], q) for i in range(17)])
    for t in (1, 2, 3, 4, 5, 8, 9, 16, 17):
        np.testing.assert_array_equal(kernels.matmul(x[:t], q), alone[:t], err_msg=f"T={t}")
    # The same token at every position of a batch of other tokens.
    others = _x(9, k, seed=4)
    for pos in range(9):
        batch = others.copy()
        batch[pos] = x[5]
        np.testing.assert_array_equal(kernels.matmul(batch, q)[pos], alone[5])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
@pytest.mark.parametrize("fmt", FORMATS)
def test_bitwise_independent_of_thread_count(fmt: str) -> None:
    k = _k(fmt, 3)
    q, x = _qtensor(fmt, 1001, k, seed=5), _x(6, k, seed=5)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = kernels.matmul(x, q)
        numba.set_num_threads(2)
        y2 = kernels.matmul(x, q)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(y1, y2)


_DIGEST_SCRIPT = """
import hashlib, numpy as np
from refinfer import kernels, quant
from refinfer.quant import QTensor
rng = np.random.default_rng(11)
digest = hashlib.sha256()
for name in ("q8_0", "q4_1", "f32"):
    fmt = quant.FORMATS[name]
    w = rng.standard_normal((777, 96), dtype=np.float32)
    q = QTensor("w", fmt, w.shape, quant.quantize(w, fmt))
    digest.update(kernels.matmul(rng.standard_normal((5, 96), dtype=np.float32), q).tobytes())
print(digest.hexdigest())
"""


def _digest_with_threads(threads: int) -> str:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_bitwise_independent_of_numba_num_threads_env() -> None:
    # A fresh process per setting: the thread pool size is fixed at start-up.
    assert _digest_with_threads(1) == _digest_with_threads(2)


_PORTABLE_SCRIPT = """
import sys, numpy as np
from numba.core.registry import cpu_target
from refinfer import kernels, quant
from refinfer.kernels.matmul_blocks import _has_ssse3
from refinfer.quant import QTensor
from quant_blocks import random_rows
print(_has_ssse3(cpu_target.target_context))
for name in ("iq4_nl", "iq4_xs"):
    fmt = quant.FORMATS[name]
    q = QTensor("w", fmt, (5, 512), random_rows(fmt, 5, 512, seed=1))
    x = np.random.default_rng(2).standard_normal((3, 512), dtype=np.float32)
    print(kernels.matmul(x, q).tobytes().hex())
"""


def _run_portable_script(cache: Path, **env_extra: str) -> list[str]:
    root = Path(__file__).resolve().parent
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(root.parent), str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _PORTABLE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_portable_table_lookup_equals_pshufb(tmp_path: Path) -> None:
    # IQ4's 16-level lookup uses pshufb where the target has SSSE3 and portable IR
    # elsewhere: compile once for this CPU and once for a generic one (fresh caches),
    # check which path each took, and compare the products bit for bit.
    import llvmlite.binding as ll

    if not ll.get_host_cpu_features().get("ssse3", False):
        pytest.skip("this CPU has no SSSE3: only the portable path exists here")
    native = _run_portable_script(tmp_path / "native")
    generic = _run_portable_script(
        tmp_path / "generic", NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="+64bit"
    )
    assert native[0] == "True" and generic[0] == "False"
    assert native[1:] == generic[1:] and len(native) == 3


# ---- the entry point's checks ----------------------------------------------------------


def test_matmul_converts_x_and_fills_out() -> None:
    q = _qtensor("q8_0", 6, 64, seed=9)
    x64 = np.asfortranarray(_x(3, 64, seed=9).astype(np.float64))
    expected = kernels.matmul(x64.astype(np.float32), q)
    out = np.empty((3, 6), np.float32)
    assert kernels.matmul(x64, q, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_matmul_rejects_unsupported_format() -> None:
    fmt = quant.Format(
        "iq2_xxs", GGMLQuantizationType.IQ2_XXS, 256, (("d", "f16", 2), ("qs", "u8", 64))
    )
    q = QTensor("blk.0.ffn_down.weight", fmt, (2, 256), np.zeros((2, 66), np.uint8))
    with pytest.raises(UnsupportedFormatError, match="iq2_xxs"):
        kernels.matmul(np.zeros((1, 256), np.float32), q)


@pytest.mark.parametrize(
    "x_shape, out_shape",
    [((1, 63), None), ((64,), None), ((2, 64), (2, 5)), ((2, 64), (6, 2))],
)
def test_matmul_rejects_shape_mismatch(x_shape, out_shape) -> None:
    q = _qtensor("q4_0", 6, 64, seed=1)
    out = None if out_shape is None else np.empty(out_shape, np.float32)
    with pytest.raises(ValueError, match="matmul|out"):
        kernels.matmul(np.zeros(x_shape, np.float32), q, out=out)
