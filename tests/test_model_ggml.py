"""numerics="ggml" in the forward pass: its distance from exact, and its bad input.

The kernels of the mode are held to their twins elsewhere (test_matmul_int8.py,
test_ggml_ops.py, test_ggml_attention.py), the whole to llama.cpp in
tests/oracle/test_ggml_fidelity.py, and the model to the project's determinism contract
(prefill, chunks, decode, batches, threads) by tests/test_model.py, whose tiny models
include ggml ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_factory import write_tiny_model
from refinfer.errors import InvalidParameterError
from refinfer.gguf import read_gguf
from refinfer.model import Model, load


def _tiny(path: Path, fmt: str, numerics: str) -> Model:
    # dim and ffn_dim multiples of 256: every matrix in `fmt`, K-quants included
    gguf = write_tiny_model(path, fmt=fmt, dim=256, ffn_dim=512, n_kv_heads=2)
    return Model(read_gguf(gguf), tokenizer=None, numerics=numerics)


def test_ggml_is_near_exact_but_not_equal(tmp_path: Path) -> None:
    # 8-bit activations and f16 K/V move the logits by a fraction of a percent of their
    # spread (SmolLM2: KLD ~4e-3 from exact); a mode switch that changed nothing, or broke
    # the model, fails one side
    ids = np.random.default_rng(3).integers(0, 128, 24)
    exact = _tiny(tmp_path / "e.gguf", "q8_0", "exact").logits(ids)
    ggml = _tiny(tmp_path / "g.gguf", "q8_0", "ggml").logits(ids)
    assert not np.array_equal(exact, ggml)
    spread = exact.max() - exact.min()
    assert np.abs(exact - ggml).max() < 0.05 * spread


def test_bad_numerics_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="numerics must be one of exact, ggml"):
        load(write_tiny_model(tmp_path / "t.gguf"), numerics="fast")
