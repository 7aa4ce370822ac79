"""llama.cpp's KL-divergence base file (`llama-perplexity --kl-divergence-base FILE`).

Where this sits: perplexity.py writes one while it scores a text, or reads one and
compares the model against it (kld_report.py); compare.py reads it as rows of
log-probabilities. The layout (tools/perplexity/perplexity.cpp, little-endian):

    char[8]  "_logits_"
    uint32   n_ctx
    int32    n_vocab
    int32    n_chunk
    int32    tokens[n_chunk * n_ctx]        the text's ids, first of each chunk NOT set to BOS
    then, per chunk, per scored position p = n_ctx/2 .. n_ctx-2 (S = n_ctx - 1 - n_ctx/2 rows):
      float32  scale                        (max_logit - min_logit) / 65535
      float32  min_log_prob                 min_logit - max_logit - log(sum exp(logit - max_logit))
      uint16   q[n_vocab], padded to even   round((logit - min_logit) / scale), 0 below min_logit

where min_logit = max(min(logits), max_logit - 16). A row decodes as
log p(v) = scale * q[v] + min_log_prob: within scale / 2 <= 16 / 131070 = 1.2e-4 of the
truth above the clip, and log-probs more than 16 below the top are lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refinfer.errors import OracleFileError

MAGIC = b"_logits_"
HEADER = np.dtype([("magic", "S8"), ("n_ctx", "<u4"), ("n_vocab", "<i4"), ("n_chunk", "<i4")])
CLIP = 16.0  # log-probs more than CLIP below the row's top are stored as the row's minimum


def scored_rows(n_ctx: int) -> int:
    """S: the positions of a chunk that are scored, n_ctx/2 .. n_ctx-2."""
    return n_ctx - 1 - n_ctx // 2


def row_dtype(n_vocab: int) -> np.dtype:
    """One stored row: scale, min_log_prob and the uint16 codes, padded to an even count."""
    return np.dtype(
        [("scale", "<f4"), ("min_log_prob", "<f4"), ("q", "<u2", (2 * ((n_vocab + 1) // 2),))]
    )


def encode(logits: np.ndarray) -> np.ndarray:
    """Rows of float32 logits[S, V] -> stored rows, with llama.cpp's float32 arithmetic
    (log_softmax in perplexity.cpp; nearest_int rounds half to even, as np.rint)."""
    x = logits.astype(np.float32)
    top = x.max(axis=-1, keepdims=True)  # (S, 1)
    low = np.maximum(x.min(axis=-1, keepdims=True), top - np.float32(CLIP))
    sum_exp = np.exp(x - top).astype(np.float64).sum(axis=-1, keepdims=True)
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    scale = (top - low) / np.float32(65535)
    out = np.zeros(len(x), row_dtype(x.shape[1]))
    out["scale"], out["min_log_prob"] = scale[:, 0], (low - top - log_sum_exp)[:, 0]
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.where(x > low, np.rint(inv * (x - low)), 0)  # (S, V)
    out["q"][:, : x.shape[1]] = q.astype(np.uint16)
    return out


def decode(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Stored rows -> float32 log p[S, V] = scale * q + min_log_prob."""
    q = rows["q"][:, :n_vocab].astype(np.float32)
    return rows["scale"][:, None] * q + rows["min_log_prob"][:, None]


@dataclass(frozen=True)
class KLDBase:
    """A base file, memory-mapped: its header, tokens and stored rows (n_chunk, S)."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # int32[n_chunk * n_ctx]
    rows: np.ndarray  # row_dtype[n_chunk, S]

    @property
    def n_chunk(self) -> int:
        return len(self.rows)

    def log_probs(self, chunk: int) -> np.ndarray:
        """float32 log p[S, V] of one chunk's scored positions."""
        return decode(self.rows[chunk], self.n_vocab)

    def chunk_tokens(self, chunk: int) -> np.ndarray:
        """int32[n_ctx]: the chunk's ids as stored (its first not yet replaced by BOS)."""
        return self.tokens[chunk * self.n_ctx : (chunk + 1) * self.n_ctx]


def is_kld_file(path: str | Path) -> bool:
    """Does the file start with llama.cpp's magic "_logits_"?"""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read(path: str | Path) -> KLDBase:
    """Open a base file; OracleFileError if it is missing, of another format or truncated."""
    path = Path(path)
    if not path.is_file():
        raise OracleFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size < HEADER.itemsize or not is_kld_file(path):
        raise OracleFileError(f"{path}: not a llama.cpp KL-divergence base file (no _logits_)")
    h = np.fromfile(path, HEADER, count=1)[0]
    n_ctx, n_vocab, n_chunk = int(h["n_ctx"]), int(h["n_vocab"]), int(h["n_chunk"])
    if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
        raise OracleFileError(
            f"{path}: bad header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})"
        )
    rows_at = HEADER.itemsize + 4 * n_ctx * n_chunk
    expected = rows_at + n_chunk * scored_rows(n_ctx) * row_dtype(n_vocab).itemsize
    if size != expected:
        raise OracleFileError(
            f"{path}: {size} bytes where n_ctx {n_ctx}, n_vocab {n_vocab} and "
            f"{n_chunk} chunks make {expected}; truncated or damaged"
        )
    tokens = np.memmap(path, "<i4", "r", HEADER.itemsize, (n_chunk * n_ctx,))
    rows = np.memmap(path, row_dtype(n_vocab), "r", rows_at, (n_chunk, scored_rows(n_ctx)))
    return KLDBase(n_ctx, n_vocab, np.asarray(tokens), rows)


class KLDBaseWriter:
    """Writes a base file chunk by chunk: the header and tokens first, then each chunk's
    rows as the model scores them (as llama-perplexity does)."""

    def __init__(self, path: str | Path, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        """tokens: int32[n_chunk * n_ctx], the chunks' ids as they were in the text."""
        self.n_ctx, self.n_vocab = n_ctx, n_vocab
        header = np.array([(MAGIC, n_ctx, n_vocab, len(tokens) // n_ctx)], HEADER)
        self.file = open(path, "wb")
        self.file.write(header.tobytes() + np.asarray(tokens, "<i4").tobytes())

    def write_chunk(self, logits: np.ndarray) -> None:
        """Append one chunk's rows: logits[S, V] of positions n_ctx/2 .. n_ctx-2."""
        assert logits.shape == (scored_rows(self.n_ctx), self.n_vocab), logits.shape
        self.file.write(encode(logits).tobytes())

    def __enter__(self) -> KLDBaseWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
