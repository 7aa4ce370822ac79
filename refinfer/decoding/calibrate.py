"""Calibration of self-speculative decoding: which layers the draft runs, chosen on a text.

A self-speculative draft is the target run through a subset of its layers (decoding/draft.py).
Fewer layers make a cheaper draft that the target rejects more often; which layers matter
depends on the model, so they are measured, not hard-coded (Draft & Verify, Zhang et al.
2023, searches them too). The search, on the token ids of a calibration text:

1. Prefill the text through every layer: the target's K/V for each prefix, and its argmax
   y_t at each position t.
2. agreement(S) = the fraction of sampled positions t where the draft through layers S,
   run at position t on top of the full model's K/V of the prefix (exactly as it drafts),
   predicts y_t. All positions go in one forward call: each is a fork of the text's
   sequence truncated to t. agreement(S) estimates the acceptance rate a of a drafted token.
3. Rank layers by agreement(all but l): the layer whose removal costs least goes first.
   Drop the r first-ranked layers for r = 1 .. L-1 and estimate each set's speed-up with
   k drafts of cost c each (the draft's share of the weights a decoding step streams) and
   the cost model of speculative.DraftLength, in decoding steps:

       tokens per step = (1 - a^(k+1)) / (1 - a),
       speed-up = tokens per step / (1 + VERIFY_COST k + c k)

4. Run real self-speculative generation for the best few estimates and for plain decoding;
   keep the fastest, and record its measured acceptance rate and speed.

The result is a small JSON file beside the model (`MODEL.self-speculative.json`), which
`generate --decoding self-speculative` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from refinfer.decoding.draft import DraftModelProposer
from refinfer.decoding.speculative import VERIFY_COST
from refinfer.errors import InvalidParameterError, RefinferError
from refinfer.kv_pool import BLOCK_SIZE
from refinfer.model import Batch, Model

MIN_TEXT_TOKENS = 64  # fewer positions measure too little
SAMPLED_POSITIONS = 64  # positions at which agreement is measured
MEASURED_CANDIDATES = 3  # layer sets timed in real generation
GENERATED_TOKENS = 64  # per timed generation


@dataclass(frozen=True)
class Calibration:
    """The chosen draft layers and what they measured on the calibration text."""

    layers: list[int]  # the layers the draft runs, in order
    n_layers: int  # the model's layers
    draft_k: int  # tokens drafted per step when measuring
    agreement: float  # draft argmax == target argmax at the sampled positions
    acceptance_rate: float  # accepted / proposed in the timed generation
    tokens_per_call: float  # tokens emitted per target forward call in it
    plain_tokens_per_second: float  # plain greedy decoding, same prompt, same run
    tokens_per_second: float  # self-speculative decoding with `layers`
    text_tokens: int  # tokens of the calibration text used

    @property
    def speedup(self) -> float:
        """Measured decode speed relative to plain decoding."""
        return self.tokens_per_second / self.plain_tokens_per_second


def calibration_path(model_path: str | os.PathLike) -> Path:
    """Where a model's calibration lives: MODEL.self-speculative.json beside MODEL.gguf."""
    return Path(model_path).with_suffix(".self-speculative.json")


def read_calibration(model_path: str | os.PathLike) -> Calibration:
    """The calibration beside a model, or a RefinferError saying how to make one."""
    path = calibration_path(model_path)
    try:
        return Calibration(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise RefinferError(
            f"no self-speculative calibration for {Path(model_path).name}: run `refinfer "
            f"calibrate {model_path} --text FILE` first, or pass draft_layers"
        ) from None
    except (ValueError, TypeError) as e:
        raise RefinferError(f"{path}: not a calibration file ({e}); run calibrate again") from e


def write_calibration(calibration: Calibration, path: str | os.PathLike) -> None:
    """Write the calibration as JSON (one small object, keys in field order)."""
    Path(path).write_text(json.dumps(asdict(calibration), indent=2) + "\n")


def calibrate(
    model: Model,
    ids: Sequence[int],
    draft_k: int = 5,
    progress: Callable[[str], None] = lambda message: None,
) -> Calibration:
    """Choose the self-speculative draft layers on the token ids of a text (module doc)."""
    L = model.config.n_layers
    if len(ids) < MIN_TEXT_TOKENS:
        raise InvalidParameterError(
            f"the calibration text has {len(ids)} tokens; give at least {MIN_TEXT_TOKENS}"
        )
    if L < 2:
        raise InvalidParameterError("a model of one layer has no layer to skip")
    ids = list(ids[: model.config.context_length])
    probe = _AgreementProbe(model, ids)
    progress(f"ranking {L} layers")
    without = [probe.agreement([j for j in range(L) if j != i]) for i in range(L)]
    ranking = sorted(range(L), key=lambda i: -without[i])  # least needed layer first (stable)
    candidates = []  # (estimated speed-up, layers, agreement)
    for r in range(1, L):
        layers = sorted(ranking[r:])
        a, c = probe.agreement(layers), DraftModelProposer(model, layers).draft_cost
        candidates.append((_estimated_speedup(a, c, draft_k), layers, a))
        progress(f"{len(layers)} layers: agreement {a:.2f}, estimated speed-up "
                 f"{candidates[-1][0]:.2f}")  # fmt: skip
    probe.close()
    candidates.sort(key=lambda c: -c[0])
    return _measure(model, ids, draft_k, candidates[:MEASURED_CANDIDATES], progress)


class _AgreementProbe:
    """The text prefilled through every layer; agreement(S) of a draft through layers S."""

    def __init__(self, model: Model, ids: list[int]) -> None:
        self.model, self.ids = model, ids
        n = len(ids)
        self.positions = np.unique(np.linspace(1, n - 1, SAMPLED_POSITIONS).astype(int))
        # room for the text plus one block per position (a copy of a partial block, or a new one)
        self.pool = model.new_pool(n + len(self.positions) * BLOCK_SIZE)
        self.seq = self.pool.new_sequence()
        logits = model.forward(Batch.append(self.pool, [(self.seq, ids)]), self.pool)
        self.target = np.argmax(logits[self.positions], axis=1)  # y_t at each sampled t

    def agreement(self, layers: Sequence[int]) -> float:
        """Fraction of sampled positions where the draft through `layers` predicts y_t."""
        pool, forks = self.pool, []
        for t in self.positions:  # a fork holding ids[:t], to run ids[t] on
            forks.append(pool.fork(self.seq))
            pool.truncate(forks[-1], int(t))
        chunks = [(f, [self.ids[t]]) for f, t in zip(forks, self.positions, strict=True)]
        logits = self.model.forward(Batch.append(pool, chunks), pool, layers)  # (P, V)
        for f in forks:
            pool.free(f)
        return float(np.mean(np.argmax(logits, axis=1) == self.target))

    def close(self) -> None:
        """Free the text's sequence."""
        self.pool.free(self.seq)


def _estimated_speedup(a: float, c: float, k: int) -> float:
    """tokens per step / cost per step, in decoding steps (the cost model of DraftLength)."""
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (1 + VERIFY_COST * k + c * k)


def _measure(model: Model, ids: list[int], draft_k: int, candidates: list, progress) -> Calibration:
    """Time plain and self-speculative generation for each candidate; keep the fastest."""
    from refinfer.decoding.generate import generate

    prompt = ids[: min(len(ids) // 2, model.config.context_length - GENERATED_TOKENS)]
    n = GENERATED_TOKENS

    def run(decoding):
        return generate(model, prompt, n, decoding=decoding, draft_k=draft_k).stats

    run("plain")  # warm-up: work buffers, kernels, pages of the weights
    plain = run("plain").decode_tokens_per_second
    progress(f"plain decoding: {plain:.1f} tok/s")
    best = None
    for _, layers, a in candidates:
        s = run(DraftModelProposer(model, layers=layers))
        result = Calibration(
            layers=layers, n_layers=model.config.n_layers, draft_k=draft_k, agreement=a,
            acceptance_rate=s.steps.acceptance_rate, tokens_per_call=s.steps.tokens_per_call,
            plain_tokens_per_second=plain, tokens_per_second=s.decode_tokens_per_second,
            text_tokens=len(ids),
        )  # fmt: skip
        progress(f"{len(layers)} layers: {result.tokens_per_second:.1f} tok/s "
                 f"({result.speedup:.2f}x), acceptance {result.acceptance_rate:.2f}")  # fmt: skip
        if best is None or result.tokens_per_second > best.tokens_per_second:
            best = result
    return best
