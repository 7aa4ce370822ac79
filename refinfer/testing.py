"""refinfer as a pytest plugin: another engine's tests compare its logits with refinfer's.

Where this sits: on top of refinfer.oracle (compare.py's statistics and tolerances,
files.py's logits files); registered as the pytest11 entry point `refinfer`, so it
is active wherever refinfer is installed. It gives:

    assert_logits_close(actual, expected, ids=...)   expected: an array, a logits file
                                                     (.npz) or a refinfer Model
    refinfer_model      fixture: the model of the `refinfer_model` ini option (default:
                        SmolLM2), loaded once; the test is skipped when the file is absent
    refinfer_logits     fixture: ids -> refinfer's float32 logits of refinfer_model
    refinfer_golden     fixture: golden(path, actual, ids) compares with a golden logits
                        file, or writes it under `pytest --refinfer-regen`
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from refinfer.errors import ModelFileError
from refinfer.oracle import compare, files

DEFAULT = compare.Tolerance(max_abs=1e-3, min_top1=1.0)  # a float32 engine (README's model)


def _expected_rows(expected, ids: Sequence[int] | None) -> compare.Rows:
    """The expected side as rows: a Model's logits of ids, a logits file, or an array."""
    if hasattr(expected, "logits"):  # a refinfer Model
        return compare.Rows.from_logits("refinfer", ids, expected.logits(list(ids)), {})
    if isinstance(expected, (str, Path)):
        return compare.open_rows(expected)
    return compare.Rows.from_logits("expected", ids, np.asarray(expected), {})


def assert_logits_close(actual, expected, ids: Sequence[int] | None = None,
                        tolerance: compare.Tolerance = DEFAULT) -> dict:  # fmt: skip
    """AssertionError, naming the worst position, unless the logits actual[T, V] meet the
    tolerance against expected (an array, a logits file or a Model; a Model needs ids).
    Returns the comparison (compare.compare_rows) for further checks."""
    exp = _expected_rows(expected, ids if ids is not None else range(len(actual)))
    act = compare.Rows.from_logits("actual", exp.ids, np.asarray(actual), {})
    r = compare.compare_rows(exp, act, top_k=tolerance.top_k or 5)
    problems = compare.failures(r, tolerance, exp.ids)
    if problems:
        raise AssertionError("logits differ: " + "; ".join(problems))
    return r


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("refinfer")
    group.addoption("--refinfer-regen", action="store_true",
                    help="rewrite refinfer golden logits files instead of comparing")  # fmt: skip
    parser.addini("refinfer_model", "the GGUF of the refinfer_model fixture (default: SmolLM2)")


@pytest.fixture(scope="session")
def refinfer_model(pytestconfig: pytest.Config):
    """The model of the `refinfer_model` ini option, or SmolLM2; skips when it is absent."""
    import refinfer

    path = pytestconfig.getini("refinfer_model") or None
    if path is not None and not Path(path).is_file():
        pytest.skip(f"refinfer model {path} is absent")
    try:
        return refinfer.load(path)
    except ModelFileError as e:
        pytest.skip(f"refinfer model unavailable: {e}")


@pytest.fixture(scope="session")
def refinfer_logits(refinfer_model):
    """ids -> refinfer's float32 logits[len(ids), V] of refinfer_model."""
    return lambda ids: refinfer_model.logits(list(ids))


@pytest.fixture
def refinfer_golden(request: pytest.FixtureRequest):
    """golden(path, actual, ids, tolerance=DEFAULT): compare logits with a golden file;
    with --refinfer-regen, (re)write the file from actual instead."""
    regen = request.config.getoption("--refinfer-regen")

    def golden(path, actual, ids: Sequence[int], tolerance: compare.Tolerance = DEFAULT):
        if regen:
            prov = {"computed_by": f"pytest --refinfer-regen ({request.node.nodeid})"}
            files.OracleFile("logits", np.asarray(ids), {"logits": np.asarray(actual)},
                             prov).save(path)  # fmt: skip
            return None
        if not Path(path).is_file():
            pytest.fail(f"golden file {path} is missing; write it with pytest --refinfer-regen")
        return assert_logits_close(actual, path, ids, tolerance)

    return golden
