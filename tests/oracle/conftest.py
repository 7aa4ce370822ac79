"""Fixtures of the oracle tests: a tiny model that reads text (byte_vocab.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from byte_vocab import write_byte_vocab_model


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 2-layer Llama with a byte vocabulary that adds BOS (V = 258)."""
    return write_byte_vocab_model(tmp_path_factory.mktemp("bytes") / "bytes.gguf")
