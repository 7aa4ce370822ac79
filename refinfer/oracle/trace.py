"""Per-layer taps: the named intermediates of one prefill, as llama.cpp names them.

Where this sits: model.forward and reference.forward call a tap at each named point
(zero cost when none is given); this file records what the tap sees into a dict
and files.py writes it as a trace file; compare.py finds the first tensor that
differs. The names follow llama.cpp's graph (`llama-eval-callback` prints them), for
layer N in 0..L-1 and in the order they are computed:

    attn_norm-N  (T, D)        RMSNorm(x) * attn_norm
    Qcur-N       (T, H, HD)    queries after the q norm and RoPE
    Kcur-N       (T, KVH, HD)  keys after the k norm and RoPE
    Vcur-N       (T, KVH, HD)
    kqv_out-N    (T, H * HD)   attention output, before Wo
    attn_out-N   (T, D)        after Wo (and Gemma 3's post-attention norm)
    ffn_inp-N    (T, D)        x + attn_out: the residual stream entering the MLP
    ffn_out-N    (T, D)        the MLP's output, before the residual add
    l_out-N      (T, D)        ffn_inp + ffn_out: the layer's output
    result_norm  (T, D)        the final RMSNorm
    result_output (T, V)       the logits

(llama.cpp reuses the name ffn_out for the residual sum, which it then names l_out;
here ffn_out is the MLP's output alone, which is what a diff needs.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

import refinfer
from refinfer.errors import InvalidParameterError
from refinfer.oracle.files import OracleFile, provenance

LAYER_TAPS = (
    "attn_norm",
    "Qcur",
    "Kcur",
    "Vcur",
    "kqv_out",
    "attn_out",
    "ffn_inp",
    "ffn_out",
    "l_out",
)
FINAL_TAPS = ("result_norm", "result_output")


def tap_names(n_layers: int) -> list[str]:
    """Every tap name of a model with n_layers layers, in graph order."""
    layer = [f"{name}-{i}" for i in range(n_layers) for name in LAYER_TAPS]
    return layer + list(FINAL_TAPS)


def select(n_layers: int, names: Sequence[str] | None) -> list[str]:
    """The tap names `names` asks for, in graph order: exact names ('Qcur-3') or a base
    name for every layer ('Qcur'); None: all."""
    every = tap_names(n_layers)
    if names is None:
        return every
    known = set(LAYER_TAPS + FINAL_TAPS) | set(every)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidParameterError(
            f"unknown tap name(s) {', '.join(unknown)}; known: {', '.join(LAYER_TAPS + FINAL_TAPS)}"
            f" (all layers) or NAME-N for layer N < {n_layers}"
        )
    wanted = set(names)
    return [n for n in every if n in wanted or re.sub(r"-\d+$", "", n) in wanted]


def recorder(names: Sequence[str]):
    """(tap, taps): a tap that copies the named arrays it sees into the dict taps."""
    wanted, taps = set(names), {}

    def tap(name: str, value: np.ndarray) -> None:
        if name in wanted:
            taps[name] = np.array(value)  # a copy: the fast path hands over work buffers

    return tap, taps


def trace(
    model, ids: Sequence[int], names: Sequence[str] | None = None, reference: bool = False
) -> dict[str, np.ndarray]:
    """{name: array[len(ids), ...]} of one fresh prefill of ids, in graph order: float32
    from model.forward, or float64 from reference.py with reference=True."""
    chosen = select(model.config.n_layers, names)
    tap, taps = recorder(chosen)
    if reference:
        refinfer.reference.logits(model, ids, tap)
    else:
        model.logits(ids, tap)
    return {n: taps[n] for n in chosen}


def trace_file(
    model, ids: Sequence[int], names: Sequence[str] | None = None, reference: bool = False
) -> OracleFile:
    """A trace file of ids (files.py): the taps of trace() with the ids and provenance."""
    taps = trace(model, ids, names, reference)
    by = "reference.py" if reference else "model.forward"
    return OracleFile("trace", np.asarray(ids, np.int32), taps, provenance(model, by))
