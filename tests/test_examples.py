"""The walk-throughs in examples/ run top to bottom and their asserts hold.

Each jupytext py:percent source is plain Python (Markdown cells are comments), so it runs
in-process, with matplotlib's non-interactive backend and REFINFER_EXAMPLES_FAST=1 (short
prompts, few tokens, small sweeps; see examples/walkthrough.py). `make notebooks` runs them
in full through Jupyter instead, keeping their outputs and figures.
"""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
jupytext = pytest.importorskip("jupytext")

# Short forward calls: a second Numba thread mostly waits (results do not depend on it).
pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("[0-9][0-9]_*.py"))


def test_there_are_seven_walkthroughs() -> None:
    assert len(NOTEBOOKS) >= 7, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_percent_notebook_without_kernels(path: Path) -> None:
    notebook = jupytext.read(path)
    kinds = {cell.cell_type for cell in notebook.cells}
    assert kinds == {"markdown", "code"}, kinds
    assert notebook.cells[0].source.startswith("# "), "a notebook opens with its title"
    assert "njit" not in path.read_text(), "kernels live in refinfer/kernels, not in notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_asserts_hold(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFINFER_EXAMPLES_FAST", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES))  # walkthrough.py, as beside a running notebook
    monkeypatch.chdir(EXAMPLES)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "FigureCanvasAgg is non-interactive")
        runpy.run_path(str(path), run_name="__main__")
    plt.close("all")
