"""refinfer: a CPU inference engine for Llama-family models, written to be read and trusted.

The public API is small and stable (other projects' CI calls it); see README.md.
Importing this package is cheap: Numba kernels compile on first use.
"""

from refinfer.errors import (
    ModelFileError,
    RefinferError,
    UnsupportedFormatError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "ModelFileError",
    "RefinferError",
    "UnsupportedFormatError",
    "UnsupportedModelError",
    "__version__",
]
