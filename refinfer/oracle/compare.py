"""Compare two outputs of the same token ids: statistics, tolerances, and where they differ.

Where this sits: after files.py and kld_file.py, behind `refinfer compare A B` and
refinfer.testing.assert_logits_close. A is the base (expected), B the one tested.
Over every position t and vocabulary entry v of two logits arrays a and b:

    max |Δ|      max_{t,v} |b[t,v] - a[t,v]|                 (and where)
    NMSE         sum (b - a)^2 / sum a^2                      (ggml's test-backend-ops)
    KLD(t)       sum_v p_a(v) (log p_a(v) - log p_b(v))       (mean and llama.cpp's percentiles)
    top-1        fraction of t with argmax a[t] == argmax b[t]
    top-k rule   where the argmaxes differ, each side's argmax is in the other's top k
                 (vLLM's check_logprobs_close; here at every position, as the ids are shared)

A llama.cpp KLD base file stores log-probabilities, not logits: if either side is
one, both are compared as log-softmax rows. Two trace files are walked tensor by
tensor in graph order to the first one that differs beyond the tolerance.

Each side's numerics ('exact' or 'ggml', recorded in refinfer's files; a KLD base file
has none) is reported; `refinfer compare` refuses two files of different numerics
without --allow-mixed-numerics, since their difference is then partly the arithmetic's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refinfer.errors import OracleFileError
from refinfer.oracle import files, kld_file
from refinfer.oracle.stats import (
    KLD_PERCENTILES,
    kld,
    log_softmax,
    nmse,
    percentile,
    top_k_contains,
)

TOLERANCE_MODEL = """\
What refinfer guarantees (tested):
  - bitwise identical logits whatever the thread count, the rest of the batch, and
    whether a position was computed in prefill or decode (for one KV block size);
  - the fast path (float32) equals reference.py (float64, same dequantised weights)
    closely: max |dlogit| 1.7e-6, NMSE 8e-14 on a tiny random model (tests/oracle).
Measured, not guaranteed:
  - against HF transformers in float32 on the same GGUF: max |dlogit| ~1e-4;
  - against llama.cpp 0.3.36's CPU path, which rounds activations to 8 bits before
    each quantised matmul (SmolLM2 Q4_1, 256 tokens): mean KLD 4.0e-3 (max 2.5e-2),
    max |dlogit| 1.58, NMSE 3.5e-4, top-1 95.7%, vLLM's top-5 rule held everywhere.
Recommended thresholds:
  same engine, another machine or thread count     --max-abs 0        (bitwise)
  an engine with float32 activations (HF, ...)     --max-abs 1e-3 --min-top1 1
  an engine with 8-bit activations (llama.cpp)     --max-kld 1e-2 --top-k 5
  a new quantisation of the weights                --max-kld 5e-2 (llama.cpp's usual scale)
  traces (compare two trace files)                 --max-nmse 1e-7 (test-backend-ops)
"""
BLOCK_ROWS = 64  # rows compared at once: bounds the float64 copies to 64 x V
TRACE_NMSE = 1e-7  # test-backend-ops' default: the trace tolerance when none is given


@dataclass(frozen=True)
class Tolerance:
    """The bounds a comparison must meet; None: not checked."""

    max_abs: float | None = None  # on max |Δlogit| over all positions and entries
    max_nmse: float | None = None  # on the NMSE of all logits (of each tensor, for traces)
    max_kld: float | None = None  # on the mean KLD over positions
    min_top1: float | None = None  # on the fraction of positions with the same argmax
    top_k: int | None = None  # vLLM's containment rule with this k, at every position


@dataclass(frozen=True)
class Rows:
    """One side of a logits comparison: the ids, the position each row is the output
    at, and the rows themselves, read a block at a time (a KLD file decodes lazily)."""

    path: str
    provenance: dict
    ids: np.ndarray  # int32[N]
    positions: np.ndarray  # int64[R]
    log_probs: bool  # rows are log p (a llama.cpp KLD base file), not logits
    read: Callable[[int, int], np.ndarray]  # (r0, r1) -> float[r1 - r0, V]
    n_vocab: int

    @classmethod
    def from_logits(cls, name: str, ids, logits: np.ndarray, provenance: dict) -> Rows:
        """Rows of a logits array[T, V]: row t is the output at position t."""
        ids = np.asarray(ids, dtype=np.int32)
        if logits.ndim != 2 or len(logits) != len(ids):
            raise OracleFileError(f"{name}: logits of shape {logits.shape} for {len(ids)} ids")
        return cls(name, provenance, ids, np.arange(len(logits)), False,
                   lambda r0, r1: logits[r0:r1], logits.shape[1])  # fmt: skip


def open_rows(path: str | Path) -> Rows:
    """A logits file (.npz) or a llama.cpp KLD base file, as rows to compare."""
    if Path(path).is_file() and kld_file.is_kld_file(path):
        base = kld_file.read(path)
        first, S = base.n_ctx // 2, kld_file.scored_rows(base.n_ctx)
        positions = (np.arange(base.n_chunk)[:, None] * base.n_ctx + first + np.arange(S)).ravel()
        stored = base.rows.reshape(-1)
        return Rows(
            str(path),
            {"format": "llama.cpp KLD base"},
            base.tokens,
            positions,
            True,
            lambda r0, r1: kld_file.decode(stored[r0:r1], base.n_vocab),
            base.n_vocab,
        )
    f = files.read(path)
    if f.kind != "logits":
        raise OracleFileError(f"{path}: a trace file; compare it with another trace file")
    return Rows.from_logits(str(path), f.ids, f.arrays["logits"], f.provenance)


def numerics_of(provenance: dict) -> str | None:
    """The numerics ('exact' or 'ggml') a side was computed with, None where its file does
    not record it (a llama.cpp KLD base file, an array)."""
    return provenance.get("numerics")


def _side(provenance: dict) -> str:
    """'model.forward, numerics exact': what computed one side, for the text reports."""
    by = provenance.get("computed_by", provenance.get("format", "an array"))
    return f"{by}, numerics {numerics_of(provenance) or 'not recorded'}"


def check_same_input(a: Rows, b: Rows) -> None:
    """OracleFileError unless A and B score the same ids at the same positions."""
    if a.n_vocab != b.n_vocab:
        raise OracleFileError(
            f"{a.path} and {b.path} have different vocabularies "
            f"({a.n_vocab} and {b.n_vocab} entries)"
        )
    if len(a.ids) != len(b.ids) or not np.array_equal(a.ids, b.ids):
        n = min(len(a.ids), len(b.ids))
        at = np.flatnonzero(a.ids[:n] != b.ids[:n])
        where = f"first differing at position {at[0]}" if len(at) else "different lengths"
        raise OracleFileError(
            f"{a.path} and {b.path} hold different token ids ({len(a.ids)} "
            f"and {len(b.ids)} ids, {where})"
        )
    if not np.array_equal(a.positions, b.positions):
        raise OracleFileError(f"{a.path} and {b.path} score different positions")


def block_stats(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-row statistics of one block of rows a, b [r, V] (float64)."""
    diff = np.abs(b - a)
    top_a, top_b = a.argmax(axis=-1), b.argmax(axis=-1)
    return {
        "max_abs": diff.max(axis=-1),
        "max_abs_entry": diff.argmax(axis=-1),
        "sq_err": np.square(diff).sum(axis=-1),
        "sq_a": np.square(a).sum(axis=-1),
        "kld": kld(log_softmax(a), log_softmax(b)),
        "argmax_a": top_a,
        "argmax_b": top_b,
        "top_k_ok": (top_a == top_b) | (top_k_contains(top_a, b, k) & top_k_contains(top_b, a, k)),
    }


def row_stats(a: Rows, b: Rows, k: int) -> dict[str, np.ndarray]:
    """Per-position statistics of A against B, BLOCK_ROWS rows at a time."""
    blocks = []
    for r0 in range(0, len(a.positions), BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, len(a.positions))
        x, y = a.read(r0, r1).astype(np.float64), b.read(r0, r1).astype(np.float64)
        if a.log_probs or b.log_probs:  # compare log-probabilities: logits' shift cancels
            x, y = log_softmax(x), log_softmax(y)
        blocks.append(block_stats(x, y, k))
    return {name: np.concatenate([s[name] for s in blocks]) for name in blocks[0]}


def compare_rows(a: Rows, b: Rows, top_k: int = 5) -> dict:
    """The summary of A against B (the module docstring's statistics) and per position."""
    check_same_input(a, b)
    s = row_stats(a, b, top_k)
    worst = int(s["max_abs"].argmax())
    differ = np.flatnonzero(s["argmax_a"] != s["argmax_b"])
    return {
        "a": a.path,
        "b": b.path,
        "a_provenance": a.provenance,
        "b_provenance": b.provenance,
        "a_numerics": numerics_of(a.provenance),
        "b_numerics": numerics_of(b.provenance),
        "log_probs": a.log_probs or b.log_probs,
        "positions": len(a.positions),
        "vocab": a.n_vocab,
        "max_abs": float(s["max_abs"][worst]),
        "max_abs_position": int(a.positions[worst]),
        "max_abs_entry": int(s["max_abs_entry"][worst]),
        "nmse": float(s["sq_err"].sum() / s["sq_a"].sum()),
        "kld_mean": float(s["kld"].mean()),
        "kld_percentiles": {k.strip(): percentile(s["kld"], f) for k, f in KLD_PERCENTILES},
        "top1": float(1 - len(differ) / len(a.positions)),
        "first_argmax_diff": int(a.positions[differ[0]]) if len(differ) else None,
        "top_k": top_k,
        "top_k_violations": [int(p) for p in a.positions[~s["top_k_ok"]]],
        "per_position": {
            "position": a.positions.tolist(),
            "max_abs": s["max_abs"].tolist(),
            "nmse": (s["sq_err"] / s["sq_a"]).tolist(),
            "kld": s["kld"].tolist(),
            "argmax_a": s["argmax_a"].tolist(),
            "argmax_b": s["argmax_b"].tolist(),
        },
    }


def _at(position: int, ids: np.ndarray) -> str:
    """'position p (input id i)': where a figure was found."""
    return f"position {position} (input token id {int(ids[position])})"


def failures(r: dict, tol: Tolerance, ids: np.ndarray) -> list[str]:
    """One line per tolerance the comparison r fails, naming the worst position and token."""
    pp, out = r["per_position"], []
    what = "|Δ log p|" if r["log_probs"] else "|Δlogit|"
    if tol.max_abs is not None and r["max_abs"] > tol.max_abs:
        out.append(
            f"max {what} {r['max_abs']:.4g} > {tol.max_abs:g} at "
            f"{_at(r['max_abs_position'], ids)}, vocabulary entry "
            f"{r['max_abs_entry']}"
        )
    if tol.max_nmse is not None and r["nmse"] > tol.max_nmse:
        i = int(np.argmax(pp["nmse"]))
        out.append(
            f"NMSE {r['nmse']:.4g} > {tol.max_nmse:g}; worst at "
            f"{_at(pp['position'][i], ids)}, NMSE {pp['nmse'][i]:.4g}"
        )
    if tol.max_kld is not None and r["kld_mean"] > tol.max_kld:
        i = int(np.argmax(pp["kld"]))
        out.append(
            f"mean KLD {r['kld_mean']:.4g} > {tol.max_kld:g}; worst at "
            f"{_at(pp['position'][i], ids)}, KLD {pp['kld'][i]:.4g}"
        )
    if tol.min_top1 is not None and r["top1"] < tol.min_top1:
        p = r["first_argmax_diff"]
        i = pp["position"].index(p)
        out.append(
            f"top-1 agreement {r['top1']:.2%} < {tol.min_top1:.2%}; first at "
            f"{_at(p, ids)}: argmax {pp['argmax_a'][i]} in A, "
            f"{pp['argmax_b'][i]} in B"
        )
    if tol.top_k is not None and r["top_k_violations"]:
        p = r["top_k_violations"][0]
        i = pp["position"].index(p)
        out.append(
            f"top-{r['top_k']} rule fails at {len(r['top_k_violations'])} position(s), "
            f"first at {_at(p, ids)}: argmax {pp['argmax_a'][i]} in A, "
            f"{pp['argmax_b'][i]} in B, not each in the other's top {r['top_k']}"
        )
    return out


def format_rows_report(r: dict) -> str:
    """The summary for people, one figure a line."""
    what = "|Δ log p|" if r["log_probs"] else "|Δlogit|"
    first = r["first_argmax_diff"]
    lines = [
        f"A: {r['a']}  ({_side(r['a_provenance'])})",
        f"B: {r['b']}  ({_side(r['b_provenance'])})",
        f"positions {r['positions']}, vocabulary {r['vocab']}",
        f"max {what:<10} {r['max_abs']:.4g} at position {r['max_abs_position']}, "
        f"vocabulary entry {r['max_abs_entry']}",
        f"NMSE           {r['nmse']:.4g}",
        f"mean KLD       {r['kld_mean']:.4g}",
        "KLD            " + ", ".join(f"{k} {v:.3g}" for k, v in r["kld_percentiles"].items()),
        f"top-1          {r['top1']:.2%} same argmax; first difference: "
        + (f"position {first}" if first is not None else "none"),
        f"top-{r['top_k']} rule     "
        + (
            f"fails at {len(r['top_k_violations'])} position(s)"
            if r["top_k_violations"]
            else "holds at every position"
        ),
    ]
    return "\n".join(lines)


# ---- trace files -------------------------------------------------------------


def compare_traces(a: files.OracleFile, b: files.OracleFile, tol: Tolerance) -> dict:
    """Walk A's tensors in graph order: NMSE and max |Δ| of each, and the first one
    beyond the tolerance (default: NMSE 1e-7) with its layer and worst position."""
    if not np.array_equal(a.ids, b.ids):
        raise OracleFileError("the trace files hold different token ids")
    if tol.max_abs is None and tol.max_nmse is None:
        tol = Tolerance(max_nmse=TRACE_NMSE)
    tensors, first_bad = [], None
    for name, x in a.arrays.items():
        if name not in b.arrays:
            continue
        x2 = x.reshape(len(x), -1).astype(np.float64)
        y2 = b.arrays[name].reshape(len(x), -1).astype(np.float64)
        row_nmse, row_abs = nmse(x2, y2, axis=-1), np.abs(y2 - x2).max(axis=-1)
        t = {"name": name, "nmse": float(nmse(x2, y2)), "max_abs": float(row_abs.max())}
        tensors.append(t)
        bad = (tol.max_nmse is not None and t["nmse"] > tol.max_nmse) or (
            tol.max_abs is not None and t["max_abs"] > tol.max_abs
        )
        if bad and first_bad is None:
            layer = re.search(r"-(\d+)$", name)
            worst = int(np.argmax(row_nmse if tol.max_nmse is not None else row_abs))
            first_bad = t | {"layer": int(layer.group(1)) if layer else None, "position": worst}
    return {
        "a_numerics": numerics_of(a.provenance),
        "b_numerics": numerics_of(b.provenance),
        "tensors": tensors,
        "first_bad": first_bad,
        "only_in_a": [n for n in a.arrays if n not in b.arrays],
        "tolerance": {"max_nmse": tol.max_nmse, "max_abs": tol.max_abs},
    }


def format_trace_report(r: dict) -> str:
    """Each side's numerics, then one line per tensor."""
    sides = [f"{side} {r[side.lower() + '_numerics'] or 'not recorded'}" for side in "AB"]
    lines = ["numerics: " + ", ".join(sides)]
    for t in r["tensors"]:
        lines.append(f"{t['name']:<16} NMSE {t['nmse']:.3g}  max |Δ| {t['max_abs']:.3g}")
    if r["only_in_a"]:
        lines.append(f"only in A (not compared): {', '.join(r['only_in_a'])}")
    return "\n".join(lines)


def trace_failure(r: dict) -> str | None:
    """The line naming the first tensor, layer and position beyond the tolerance, or None."""
    bad = r["first_bad"]
    if bad is None:
        return None
    layer = f"layer {bad['layer']}" if bad["layer"] is not None else "after the last layer"
    return (
        f"first difference beyond the tolerance: {bad['name']} ({layer}), position "
        f"{bad['position']}: NMSE {bad['nmse']:.4g}, max |Δ| {bad['max_abs']:.4g}"
    )
