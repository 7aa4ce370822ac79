"""numerics="ggml"'s matrix products: kernels/matmul_int8.py against its twin ggml/dot.py.

The twin is checked against independent math (the float64 product of the dequantised
weights and the dequantised activation blocks), the kernel against the twin bit for bit,
for every block format, then the AVX2 and the portable int8 paths against each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quant_blocks import random_rows
from refinfer import kernels, quant
from refinfer.ggml import dot
from refinfer.ggml import quantize as gq
from refinfer.ggml.ops import HOST, SIMD, Simd
from refinfer.kernels import matmul_int8 as mi
from refinfer.quant import QTensor

FORMATS = list(gq.ACTIVATION_TYPE)


def _x(T, K, seed):
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-6, 1e-2, 1.0, 300.0], size=(T, 1))
    return (rng.standard_normal((T, K)) * scale).astype(np.float32)


@pytest.mark.parametrize("act", ["q8_0", "q8_1", "q8_k"])
def test_activation_quantiser_kernel_equals_twin(act) -> None:
    x = _x(6, 512, seed=1)
    x[0, :256] = 0  # an all-zero block: d = 0
    x[1, 7] = 0.5 * x[1, 3]  # nothing special, but halves of the scale occur below
    x[2] = np.round(x[2] * 4) / 4  # many exact halves of a quantum: ties to even
    blocks = mi.quantize_activations(x, act).reshape(6, -1, mi.ACT_BLOCK_BYTES[act])
    twin = gq.QUANTIZE[act](x)
    qk = 256 if act == "q8_k" else 32
    q0 = 8 if act == "q8_1" else 4
    np.testing.assert_array_equal(blocks[..., :4].copy().view(np.float32)[..., 0], twin.d)
    np.testing.assert_array_equal(
        blocks[..., q0 : q0 + qk].copy().view(np.int8).reshape(6, -1), twin.qs
    )
    if act == "q8_1":
        np.testing.assert_array_equal(blocks[..., 4:8].copy().view(np.float32)[..., 0], twin.s)
    if act == "q8_k":
        np.testing.assert_array_equal(
            blocks[..., 260:].copy().view(np.int16).reshape(6, -1), twin.bsums
        )


def test_activation_twin_is_a_close_8_bit_code() -> None:
    # d * qs reproduces x within half a quantum, plus Q8_0's rounding of d to f16 (2^-11 of d
    # for up to 127 quanta)
    # (scales >= 1e-2: below, Q8_0's d is subnormal in f16 and loses more, as in ggml)
    x = np.random.default_rng(2).standard_normal((4, 512)) * [[1e-2], [1], [30], [300]]
    x = x.astype(np.float32)
    for act, qk in (("q8_0", 32), ("q8_k", 256)):
        a = gq.QUANTIZE[act](x)
        back = np.repeat(a.d, qk, axis=1) * a.qs
        quantum = np.abs(np.repeat(a.d, qk, axis=1))  # Q8_K's d has the sign of -max
        assert np.all(np.abs(back - x) <= quantum * (0.5 + 127 * 2**-11) + 1e-30)
        assert np.abs(a.qs).max() <= 127


@pytest.mark.parametrize("name", FORMATS)
def test_twin_is_the_product_of_the_dequantised_blocks(name) -> None:
    # independent math: float64 sum of dequantised weight x dequantised activation
    fmt = quant.FORMATS[name]
    w = QTensor("w", fmt, (6, 512), random_rows(fmt, 6, 512, seed=3))
    x = _x(3, 512, seed=4)
    a = gq.QUANTIZE[gq.ACTIVATION_TYPE[name]](x)
    qk = 256 if a.bsums is not None else 32
    xa = np.repeat(a.d.astype(np.float64), qk, axis=1) * a.qs
    exact = xa @ quant.dequantize(w.data, fmt).astype(np.float64).T
    if a.s is not None:  # Q8_1's s is f16(d * sum q), not d * sum q: the offset term uses it
        m = dot.weight_codes(w).m.astype(np.float64)
        exact += a.s.astype(np.float64) @ m.T - (a.d * a.qs.reshape(3, -1, 32).sum(-1)) @ m.T
    y = dot.matmul(x, w, HOST)
    bound = 1e-5 * np.abs(xa) @ np.abs(quant.dequantize(w.data, fmt).astype(np.float64)).T
    assert np.all(np.abs(y - exact) <= bound + 1e-30)


def _run_kernel(kernel, x, w, act):
    xq = mi.quantize_activations(x, act)
    empty = np.empty((0, w.data.shape[1]), np.uint8)
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    kernel(xq, (w.data, empty, empty), quant.F16_TO_F32, (y, _NO_OUT, _NO_OUT))
    return y


_NO_OUT = np.empty((0, 0), np.float32)


@pytest.mark.parametrize("simd", list(SIMD.values()), ids=list(SIMD))
@pytest.mark.parametrize("name", FORMATS)
def test_kernel_equals_twin_bitwise(name, simd) -> None:
    # each format with the kernel llama.cpp's build `simd` runs for it (vec_dot, repacked
    # or tiled: ggml/dot.kernel_of), against the twin of that kernel
    fmt = quant.FORMATS[name]
    kernel = mi.kernel(name, simd)
    for T, N in ((1, 9), (5, 7), (11, 4)):
        w = QTensor("w", fmt, (N, 512), random_rows(fmt, N, 512, seed=T))
        x = _x(T, 512, seed=10 + T)
        y = _run_kernel(kernel, x, w, gq.ACTIVATION_TYPE[name])
        np.testing.assert_array_equal(y.view(np.uint32), dot.matmul(x, w, simd).view(np.uint32))


def test_linear_takes_the_hosts_kernels() -> None:
    w = QTensor("w", quant.Q4_K, (8, 512), random_rows(quant.Q4_K, 8, 512, seed=1))
    x = _x(3, 512, seed=2)
    y = np.empty((3, 8), np.float32)
    kernels.Linear(w, numerics="ggml")(x, y)
    np.testing.assert_array_equal(y, dot.matmul(x, w, HOST))


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q6_k"])
def test_the_kernels_arithmetic_matters(name) -> None:
    # ggml's kernels (vec_dot, repacked, tiled) sum the same integers but round their float
    # sums differently, so following the right one is what makes the outputs llama.cpp's
    # bit for bit (README, Numerics)
    fmt = quant.FORMATS[name]
    w = QTensor("w", fmt, (64, 1024), random_rows(fmt, 64, 1024, seed=5))
    x = _x(8, 1024, seed=6)
    a = gq.QUANTIZE[gq.ACTIVATION_TYPE[name]](x)
    c = dot.weight_codes(w)
    unrepacked = dot.matmul(x, w, Simd("none", 8, frozenset()))  # vec_dot or tiled
    repacked = dot._matmul_repacked(a, c, 8, 64, fmt.block_size, fmt.block_size)
    assert not np.array_equal(unrepacked, repacked)
    # ... while both are the same sum up to float32 rounding
    np.testing.assert_allclose(repacked, unrepacked, rtol=0, atol=1e-5 * np.abs(unrepacked).max())


def test_fused_matrices_equal_each_alone_and_float_formats_round_x() -> None:
    ws = [QTensor("a", quant.Q4_K, (5, 256), random_rows(quant.Q4_K, 5, 256, seed=1)),
          QTensor("b", quant.Q8_0, (3, 256), random_rows(quant.Q8_0, 3, 256, seed=2)),
          QTensor("c", quant.F16, (4, 256), random_rows(quant.F16, 4, 256, seed=3))]  # fmt: skip
    x = _x(3, 256, seed=5)
    outs = [np.empty((3, w.shape[0]), np.float32) for w in ws]
    kernels.Linear(*ws, numerics="ggml")(x, *outs)
    for w, y in zip(ws[:2], outs[:2], strict=True):
        np.testing.assert_array_equal(y, dot.matmul(x, w, HOST))
    x16 = dot.round_activations(x, quant.F16)
    np.testing.assert_array_equal(outs[2], kernels.matmul(x16, ws[2]))
    assert not np.array_equal(x16, x)


_PATHS_SCRIPT = """
import sys, numpy as np
from numba.core.registry import cpu_target
from refinfer import kernels, quant
from refinfer.kernels.matmul_int8 import _int8_isa
from refinfer.quant import QTensor
from quant_blocks import random_rows
print(_int8_isa(cpu_target.target_context))
for name in ("q4_1", "q4_k"):  # every format's products go through the one _dot4
    fmt = quant.FORMATS[name]
    w = QTensor("w", fmt, (5, 512), random_rows(fmt, 5, 512, seed=1))
    x = (np.random.default_rng(2).standard_normal((3, 512)) * 50).astype(np.float32)
    y = np.empty((3, 5), np.float32)
    kernels.Linear(w, numerics="ggml")(x, y)
    print(y.tobytes().hex())
"""


def _run(cache: Path, **env_extra: str) -> list[str]:
    root = Path(__file__).resolve().parent
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(root.parent), str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _PATHS_SCRIPT], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.split()


def test_int8_paths_give_the_same_bits(tmp_path: Path) -> None:
    # vpdpbusd where the target has VNNI, vpmaddubsw + vpmaddwd where it has AVX2, widened
    # IR elsewhere (ARM, old x86): compile each (fresh caches), check which path each
    # took, compare the bits
    import llvmlite.binding as ll

    features = ll.get_host_cpu_features()
    if not features.get("avx2", False):
        pytest.skip("this CPU has no AVX2: only the portable path exists here")
    runs = {"portable": _run(tmp_path / "generic", NUMBA_CPU_NAME="generic",
                             NUMBA_CPU_FEATURES="+64bit")}  # fmt: skip
    avx2 = "+64bit,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c"
    runs["avx2"] = _run(tmp_path / "avx2", NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=avx2)
    if features.get("avx512vnni") and features.get("avx512vl") or features.get("avxvnni"):
        runs["vnni"] = _run(tmp_path / "native")
    for isa, out in runs.items():
        assert out[0] == isa and len(out) == 3
    assert len({tuple(out[1:]) for out in runs.values()}) == 1
