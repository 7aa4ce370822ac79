"""The pytest plugin, as another engine's test suite uses it (pytester: a fresh project with
refinfer installed): assert_logits_close passes and fails naming the position, golden files
are written by --refinfer-regen and then checked, and an absent model skips cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ENGINE_TESTS = """
from refinfer.testing import assert_logits_close

IDS = [256, 72, 101, 108]

def test_close(refinfer_model, refinfer_logits):
    assert_logits_close(refinfer_logits(IDS) + 1e-5, refinfer_model, IDS)

def test_off_by_a_tenth(refinfer_model, refinfer_logits):
    bad = refinfer_logits(IDS)
    bad[2, 7] += 0.1
    assert_logits_close(bad, refinfer_model, IDS)

def test_golden(refinfer_golden, refinfer_logits):
    refinfer_golden("golden.npz", refinfer_logits(IDS), IDS)
"""


def test_another_engines_suite(pytester: pytest.Pytester, byte_model: Path) -> None:
    pytester.makeini(f"[pytest]\nrefinfer_model = {byte_model}\n")
    pytester.makepyfile(test_engine=ENGINE_TESTS)
    run = pytester.runpytest_subprocess  # numba does not survive pytester's module resets
    run("-k", "golden", "--refinfer-regen").assert_outcomes(passed=1)
    assert (pytester.path / "golden.npz").is_file()
    r = run()
    r.assert_outcomes(passed=2, failed=1)
    r.stdout.fnmatch_lines(
        ["*max |Δlogit| 0.1 > 0.001 at position 2 (input token id 101), vocabulary entry 7*"]
    )


def test_an_absent_model_skips(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makeini(f"[pytest]\nrefinfer_model = {tmp_path / 'absent.gguf'}\n")
    pytester.makepyfile(test_engine=ENGINE_TESTS)
    pytester.runpytest("-k", "close").assert_outcomes(skipped=1)  # skipped before numba runs
