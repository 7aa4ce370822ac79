"""numerics="ggml" in the forward pass: its determinism, bitwise, and its distance from exact.

The kernels of the mode are held to their twins elsewhere (test_matmul_int8.py,
test_ggml_ops.py, test_ggml_attention.py) and the whole to llama.cpp in
tests/oracle/test_ggml_fidelity.py; here the model is held to the project's determinism
contract in this mode too: a token's logits are the same bits in a prefill, in chunks,
decoded one by one, batched with other sequences and on any number of threads.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_factory import write_tiny_model
from refinfer.errors import InvalidParameterError
from refinfer.gguf import read_gguf
from refinfer.model import Batch, Model, load


def _tiny(path: Path, fmt: str, numerics: str) -> Model:
    # dim and ffn_dim multiples of 256: every matrix in `fmt`, K-quants included
    gguf = write_tiny_model(path, fmt=fmt, dim=256, ffn_dim=512, n_kv_heads=2)
    return Model(read_gguf(gguf), tokenizer=None, numerics=numerics)


@pytest.fixture(scope="module", params=["q8_0", "q4_k", "q6_k"])
def tiny(request, tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = tmp_path_factory.mktemp("g") / f"tiny-{request.param}.gguf"
    return _tiny(path, request.param, "ggml")


def _decode_one_by_one(m: Model, ids) -> np.ndarray:
    pool = m.new_pool(len(ids))
    seq = pool.new_sequence()
    return np.concatenate([m.forward(Batch.append(pool, [(seq, [t])]), pool) for t in ids])


@settings(max_examples=5, deadline=None)
@given(n=st.integers(1, 40), split=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_prefill_chunks_and_decode_are_bitwise_equal(tiny: Model, n: int, split: int, seed: int):
    ids = np.random.default_rng(seed).integers(0, 128, n)
    whole = tiny.logits(ids)
    pool = tiny.new_pool(n)
    seq = pool.new_sequence()
    parts = [ids[: min(split, n)], ids[min(split, n) :]]
    chunked = np.concatenate(
        [tiny.forward(Batch.append(pool, [(seq, p)]), pool) for p in parts if len(p)]
    )
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_array_equal(whole, _decode_one_by_one(tiny, ids))


def test_alone_equals_batched_with_others(tiny: Model) -> None:
    rng = np.random.default_rng(7)
    a, b, c = rng.integers(0, 128, 21), rng.integers(0, 128, 5), rng.integers(0, 128, 33)
    pool = tiny.new_pool(100)
    seqs = [pool.new_sequence() for _ in range(3)]
    batched = tiny.forward(Batch.append(pool, list(zip(seqs, [a, b, c], strict=True))), pool)
    np.testing.assert_array_equal(batched[:21], tiny.logits(a))
    np.testing.assert_array_equal(batched[21:26], tiny.logits(b))
    np.testing.assert_array_equal(batched[26:], tiny.logits(c))


def test_thread_count_does_not_change_logits(tiny: Model, logits_on_threads) -> None:
    ids = np.arange(30) % 128
    one = logits_on_threads(tiny, ids, 1)
    many = logits_on_threads(tiny, ids, numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(one, many)


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
