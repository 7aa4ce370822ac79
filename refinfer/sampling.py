"""Sampling: one position's logits -> the distribution to draw from -> the next token.

In the data flow it comes right after the model (`model.forward -> logits[V]`) and before
the decoding strategy accepts tokens. `probabilities` is the single definition of "the
distribution a SamplingParams means": `Sampler.sample` draws from it, and speculative
decoding's verifier compares draft and target through it, so it is exact (float64,
deterministic ties) and has no side effects. Randomness lives only in `Sampler`, one
seeded `numpy.random.Generator` per request, one uniform per token.

Filter order, as llama.cpp's default sampler chain (common/common.h: penalties, dry,
top_n_sigma, top_k, typ_p, top_p, min_p, xtc, temperature; refinfer has the ones named
here), not as HF transformers (which divides by the temperature first):

    repetition penalty -> top-k -> top-p -> min-p -> temperature -> softmax

So top-p and min-p judge the untempered distribution: temperature decides how the
surviving tokens share the probability, never which tokens survive. Each filter sees the
survivors of the one before, renormalised. Filtered-out tokens get logit -inf, so p = 0.
Temperature 0 is greedy: a one-hot at the argmax of the penalised logits (lowest id on
ties), whatever the filters say (the argmax survives all of them anyway).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from refinfer.errors import InvalidParameterError


@dataclass(frozen=True)
class SamplingParams:
    """How to choose the next token; the defaults are greedy decoding with no filter."""

    temperature: float = 0.0  # 0 = greedy (argmax); else p ~ exp(logit / temperature)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set holding >= top_p of the probability; 1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already seen; 1 = off
    seed: int | None = None  # seed of the Sampler's generator; None = fresh OS entropy

    def __post_init__(self) -> None:
        """Raise InvalidParameterError with one line naming the first nonsense value."""
        checks = (
            (self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"),
            (isinstance(self.top_k, Integral) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1,
             f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0 <= self.min_p < 1,
             f"min_p must be in [0, 1) (0 = off), got {self.min_p}"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             f"repetition_penalty must be a finite number > 0 (1 = off), "
             f"got {self.repetition_penalty}"),
            (self.seed is None or (isinstance(self.seed, Integral) and self.seed >= 0),
             f"seed must be an integer >= 0 or None, got {self.seed}"),
        )  # fmt: skip
        for ok, message in checks:  # NaN fails every comparison, so it lands here too
            if not ok:
                raise InvalidParameterError(message)

    @property
    def greedy(self) -> bool:
        """Whether these parameters pick the argmax (temperature 0)."""
        return self.temperature == 0


def apply_repetition_penalty(
    logits: np.ndarray, previous_ids: Iterable[int], penalty: float
) -> np.ndarray:
    """float64[V] copy of logits with each distinct previous token penalised (CTRL, Keskar 2019).

    As llama.cpp's penalties sampler and HF's RepetitionPenaltyLogitsProcessor: a positive
    logit is divided by the penalty, a negative one multiplied, so penalty > 1 always makes
    a seen token less likely. A token seen many times is penalised once.
    """
    out = np.array(logits, dtype=np.float64)  # (V,) a copy: the caller's logits stay as they are
    if penalty == 1.0:  # off: the previous tokens need not even be read
        return out
    ids = np.unique(np.fromiter(previous_ids, np.int64))
    if ids.size:
        seen = out[ids]
        # l' = l / penalty if l > 0 else l * penalty
        out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def probabilities(
    logits: np.ndarray, params: SamplingParams, previous_ids: Iterable[int] = ()
) -> np.ndarray:
    """float64[V]: the distribution a token is drawn from under params (see the module doc).

    Sums to 1 (to rounding); filtered-out tokens are exactly 0. Pure: no state, no randomness.
    """
    z = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)  # (V,)
    if params.greedy:
        p = np.zeros_like(z)
        p[np.argmax(z)] = 1.0  # argmax returns the lowest id on ties
        return p
    z = _top_k(z, params.top_k)
    z = _top_p(z, params.top_p)
    z = _min_p(z, params.min_p)
    return _softmax(z / params.temperature)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """float64 softmax; -inf logits get probability 0."""
    # p_i = exp(l_i - l_max) / sum_j exp(l_j - l_max)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly the k largest logits (ties at the k-th value: lowest ids first). O(V)."""
    if k == 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]  # the k-th largest value
    keep = logits > kth
    ties = np.flatnonzero(logits == kth)[: k - np.count_nonzero(keep)]
    keep[ties] = True
    return np.where(keep, logits, -np.inf)


def _top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the fewest most likely tokens whose probabilities sum to >= top_p (at least one).

    Tokens are ranked by probability, ties by lowest id. Only the head is sorted: tokens with
    p < (1 - top_p) / V hold less than 1 - top_p together, so the nucleus lies among the
    others, and sorting them gives exactly the first entries of a full sort.
    """
    if top_p >= 1.0:
        return logits
    p = _softmax(logits)  # (V,)
    head = np.flatnonzero(p >= (1.0 - top_p) / p.size)
    order = head[np.argsort(-p[head], kind="stable")]
    cum = np.cumsum(p[order])
    if cum[-1] < top_p:  # rounding left the nucleus short of the head: rank every token
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
    # n = min{n : p_(1) + ... + p_(n) >= top_p}
    n = min(int(np.searchsorted(cum, top_p)) + 1, order.size)
    out = np.full_like(logits, -np.inf)
    out[order[:n]] = logits[order[:n]]
    return out


def _min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens with p >= min_p * p_max, computed on logits as llama.cpp does."""
    if min_p == 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p)
    return np.where(logits >= logits.max() + math.log(min_p), logits, -np.inf)


class Sampler:
    """Draws tokens under one SamplingParams with its own seeded generator.

    The same seed and the same logits give the same tokens: each sampled token uses exactly
    one uniform from the generator, greedy tokens use none.
    """

    def __init__(self, params: SamplingParams) -> None:
        """Hold params and a numpy Generator seeded with params.seed."""
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, previous_ids: Iterable[int] = ()) -> int:
        """The next token: the argmax when greedy, else one draw from probabilities()."""
        if self.params.greedy:
            penalty = self.params.repetition_penalty
            return int(np.argmax(apply_repetition_penalty(logits, previous_ids, penalty)))
        return self.draw(probabilities(logits, self.params, previous_ids))

    def draw(self, p: np.ndarray) -> int:
        """One token from the distribution p (sum ~ 1) by inverse CDF with one uniform.

        Tokens with p = 0 are never drawn. Speculative decoding uses this for its residual.
        """
        cdf = np.cumsum(p)  # (V,)
        u = self.rng.random() * cdf[-1]  # in [0, total): scaling absorbs rounding in the sum
        # token = min{i : cdf_i > u}
        return int(np.searchsorted(cdf, u, side="right"))
