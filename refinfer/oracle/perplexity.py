"""Perplexity with llama-perplexity's semantics, and its KL-divergence base file both ways.

Where this sits: text -> tokenizer -> chunks -> model.forward -> the scored rows ->
PPL, or a base file (kld_file.py), or the statistics against one (kld_report.py).
As tools/perplexity/perplexity.cpp does:

- the text is tokenised once (with BOS where the vocabulary adds one) and cut into
  n_chunk = min(--chunks, len // n_ctx) chunks of n_ctx tokens (the rest is dropped);
  a text of fewer than 2 n_ctx tokens is refused;
- each chunk is a fresh sequence whose first token is replaced by BOS when the
  vocabulary adds one;
- only the second half is scored: positions p = n_ctx/2 .. n_ctx-2 predict p + 1, so
  S = n_ctx - 1 - n_ctx/2 tokens per chunk;

    NLL(t) = -log softmax(logits[p])[next],   PPL = exp(mean NLL)
    +- PPL * sqrt((mean NLL^2 - mean NLL^2) / (n - 1))   (llama.cpp's "Final estimate")

n_batch tokens go through one forward call (and n_batch / n_ctx chunks share a call
when n_batch > n_ctx, as llama.cpp's n_seq); refinfer's logits do not depend on it.
With `workers` (a distributed.WorkerPool) Ray workers run scored_logits instead of
this process, and the rest is the same code on the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import replace

import numpy as np

from refinfer.errors import InvalidParameterError
from refinfer.model import Batch
from refinfer.oracle import kld_file
from refinfer.oracle.kld_report import KLDReport
from refinfer.oracle.stats import log_softmax, mean_and_uncertainty

Progress = Callable[[int], None]  # called with the number of chunks just finished


def chunk_tokens(tokens: list[int] | np.ndarray, n_ctx: int, n_chunks: int | None) -> np.ndarray:
    """int32[n_chunk, n_ctx]: the text's ids cut into chunks, as they were in the text."""
    if n_ctx < 4:
        raise InvalidParameterError(f"-c must be at least 4 tokens, not {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise InvalidParameterError(
            f"the text is {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at "
            f"least {2 * n_ctx} (a longer text, or a smaller -c)"
        )
    n_chunk = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
    return np.asarray(tokens[: n_chunk * n_ctx], dtype=np.int32).reshape(n_chunk, n_ctx)


def scored_logits(model, chunks: np.ndarray, n_batch: int) -> Iterator[np.ndarray]:
    """float32 logits[S, V] of each chunk's positions n_ctx/2 .. n_ctx-2, chunk by chunk;
    each chunk's first token is BOS where the vocabulary adds one."""
    n_chunk, n_ctx = chunks.shape
    tok, first = model.tokenizer, n_ctx // 2
    n_seq = max(1, n_batch // n_ctx)  # chunks per forward call
    step = min(n_batch, n_ctx)  # tokens of each chunk per forward call
    for c0 in range(0, n_chunk, n_seq):
        group = chunks[c0 : c0 + n_seq].copy()
        if tok.add_bos_default:
            group[:, 0] = tok.bos_id
        pool = model.new_pool(len(group) * n_ctx)
        seqs = [pool.new_sequence() for _ in group]
        rows = [[] for _ in group]
        for j in range(0, n_ctx, step):
            batch = Batch.append(
                pool, [(s, g[j : j + step].tolist()) for s, g in zip(seqs, group, strict=True)]
            )
            keep = np.flatnonzero((batch.positions >= first) & (batch.positions < n_ctx - 1))
            logits = model.forward(replace(batch, logit_rows=keep), pool)
            for g in range(len(group)):
                rows[g].append(logits[batch.seq_index[keep] == g])
        yield from (np.concatenate(r) for r in rows)


def chunk_rows(model, chunks: np.ndarray, n_batch: int, workers=None) -> Iterator[np.ndarray]:
    """scored_logits of the chunks, from this process or from `workers`, a
    distributed.WorkerPool (bitwise the same rows, in the same order)."""
    if workers is None:
        return scored_logits(model, chunks, n_batch)
    return workers.scored_logits(chunks, n_batch)


def next_tokens(chunk: np.ndarray) -> np.ndarray:
    """int[S]: the tokens the scored positions predict, chunk[n_ctx/2 + 1 ..]."""
    return chunk[len(chunk) // 2 + 1 :]


def nll(logits: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """float64[S]: -log softmax(logits)[next] of each scored position."""
    return -log_softmax(logits)[np.arange(len(nxt)), nxt]


def summarise(nlls: list[np.ndarray]) -> dict:
    """PPL = exp(mean NLL) with llama.cpp's +-, and each chunk's running PPL."""
    all_nll = np.concatenate(nlls)
    mean, unc = mean_and_uncertainty(all_nll)
    running = np.cumsum([n.sum() for n in nlls]) / np.cumsum([len(n) for n in nlls])
    return {
        "ppl": float(np.exp(mean)),
        "ppl_uncertainty": float(np.exp(mean) * unc),
        "mean_nll": mean,
        "tokens_scored": len(all_nll),
        "chunk_ppl": np.exp(running).tolist(),
    }


def perplexity(
    model,
    tokens,
    n_ctx: int,
    n_chunks: int | None = None,
    n_batch: int = 512,
    base_out: str | None = None,
    progress: Progress | None = None,
    workers=None,
) -> dict:
    """The perplexity of a tokenised text; with base_out, also write llama.cpp's KLD base
    file of the model's log-probs there; with workers, the chunks run on them (chunk_rows)."""
    chunks = chunk_tokens(tokens, n_ctx, n_chunks)
    V, nlls = model.config.vocab_size, []
    with (
        kld_file.KLDBaseWriter(base_out, n_ctx, V, chunks.ravel())
        if base_out
        else (nullcontext()) as writer
    ):
        rows = chunk_rows(model, chunks, n_batch, workers)
        for chunk, logits in zip(chunks, rows, strict=True):
            nlls.append(nll(logits, next_tokens(chunk)))
            if writer:
                writer.write_chunk(logits)
            if progress:
                progress(1)
    return summarise(nlls) | {"n_ctx": n_ctx, "chunks": len(chunks)}


def kl_divergence(
    model, base_path: str, n_batch: int = 512, progress: Progress | None = None, workers=None
) -> KLDReport:
    """The model against a base file: its chunks (the file's tokens and n_ctx) scored (on
    workers if given, see chunk_rows) and compared row by row with the stored log-probs."""
    base = kld_file.read(base_path)
    if base.n_vocab != model.config.vocab_size:
        raise InvalidParameterError(
            f"{base_path} has a vocabulary of {base.n_vocab}, the model {model.config.vocab_size}"
        )
    chunks = base.tokens.reshape(base.n_chunk, base.n_ctx)
    report = KLDReport()
    for c, logits in enumerate(chunk_rows(model, chunks, n_batch, workers)):
        report.add_chunk(logits, base.log_probs(c), next_tokens(chunks[c]))
        if progress:
            progress(1)
    return report
