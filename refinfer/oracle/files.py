"""Logits and trace files: token ids, float arrays and their provenance in one .npz.

Where this sits: Model.logits / reference.logits / the taps of trace.py -> this file
-> disk -> compare.py (and another engine's CI, which needs only NumPy). The layout,
read with `np.load(path)`:

    format       str   'refinfer-logits/1' or 'refinfer-trace/1'
    provenance   str   JSON: model, model_sha256, refinfer_version, numerics ('exact' or
                       'ggml': the model's arithmetic; reference.py's is exact), computed_by
                       ('model.forward' or 'reference.py'), threads, kv_block_size
    ids          int32[T]       the token ids; position t holds ids[t]
    logits       float[T, V]    logits files: row t scores the token after position t
                                (float32 from model.forward, float64 from reference.py);
                                with provenance n_ctx, T is cut into fresh sequences of
                                n_ctx tokens (a corpus, which distributed.py can shard)
    <tap name>   float[T, ...]  trace files: llama.cpp's tensor names, in graph order
                                ('attn_norm-0', 'Qcur-0', ..., 'result_norm', 'result_output')

Arrays are stored as computed (np.savez, no compression, no rounding): lossless.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import refinfer
from refinfer.errors import InvalidParameterError, OracleFileError
from refinfer.kv_pool import BLOCK_SIZE

FORMATS = {"logits": "refinfer-logits/1", "trace": "refinfer-trace/1"}
HEADER = ("format", "provenance", "ids")  # the members every file has


@dataclass(frozen=True)
class OracleFile:
    """One file: its kind ('logits' or 'trace'), ids, named arrays and provenance."""

    kind: str
    ids: np.ndarray  # int32[T]
    arrays: dict[str, np.ndarray]  # {'logits': (T, V)} or {tap name: (T, ...)}, in order
    provenance: dict

    def save(self, path: str | Path) -> None:
        """Write the file (np.savez: lossless, readable with NumPy alone)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                format=np.array(FORMATS[self.kind]),
                provenance=np.array(json.dumps(self.provenance)),
                ids=self.ids.astype(np.int32),
                **self.arrays,
            )


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def provenance(model, computed_by: str) -> dict:
    """What made an output: the model file and its hash, the code, the numerics, threads.

    numerics: the model's ('exact' or 'ggml'); reference.py computes the exact math only."""
    import numba

    return {
        "model": str(model.path),
        "model_sha256": sha256(model.path),
        "refinfer_version": refinfer.__version__,
        "numerics": "exact" if computed_by == "reference.py" else model.numerics,
        "computed_by": computed_by,
        "threads": numba.get_num_threads(),
        "kv_block_size": BLOCK_SIZE,
    }


def chunk_logits(model, chunks: np.ndarray, reference: bool = False) -> Iterator[np.ndarray]:
    """logits[n_ctx, V] of each chunk as one fresh sequence: model.forward's float32, or
    reference.py's float64 with reference=True."""
    for chunk in chunks:
        yield refinfer.reference.logits(model, chunk) if reference else model.logits(chunk)


def cut(ids: np.ndarray, n_ctx: int | None) -> np.ndarray:
    """int32[n_chunk, n_ctx]: consecutive sequences of n_ctx ids (the rest dropped); all the
    ids as one sequence without n_ctx."""
    if n_ctx is None:
        return ids[None, :]  # (1, T)
    if not 1 <= n_ctx <= len(ids):
        raise InvalidParameterError(f"-c must be between 1 and the {len(ids)} tokens, not {n_ctx}")
    return ids[: len(ids) // n_ctx * n_ctx].reshape(-1, n_ctx)


def logits_file(
    model, ids, reference: bool = False, n_ctx: int | None = None, workers=None
) -> OracleFile:
    """The logits of `ids` as one fresh sequence; with n_ctx, of consecutive fresh sequences
    of n_ctx tokens (cut), computed here or by `workers`, a distributed.WorkerPool
    (bitwise the same rows, in the same order)."""
    chunks = cut(np.asarray(ids, dtype=np.int32), n_ctx)
    if workers is None:
        rows = chunk_logits(model, chunks, reference)
    else:
        rows = workers.map(chunk_logits, chunks, reference)
    by = "reference.py" if reference else "model.forward"
    prov = provenance(model, by) | ({"n_ctx": n_ctx} if n_ctx else {})
    return OracleFile("logits", chunks.ravel(), {"logits": np.concatenate(list(rows))}, prov)


def read(path: str | Path) -> OracleFile:
    """Read a logits or trace file; OracleFileError if it is missing or not one."""
    if not Path(path).is_file():
        raise OracleFileError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise OracleFileError(f"{path}: not a refinfer logits or trace file (.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            members = {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise OracleFileError(f"{path}: a damaged or truncated .npz ({e})") from e
    kinds = {v: k for k, v in FORMATS.items()}
    fmt = str(members.get("format", ""))
    if fmt not in kinds or not all(h in members for h in HEADER):
        raise OracleFileError(f"{path}: not a refinfer logits or trace file (format {fmt!r})")
    arrays = {k: v for k, v in members.items() if k not in HEADER}
    if kinds[fmt] == "logits" and "logits" not in arrays:
        raise OracleFileError(f"{path}: a logits file without a 'logits' array")
    return OracleFile(kinds[fmt], members["ids"], arrays, json.loads(str(members["provenance"])))
