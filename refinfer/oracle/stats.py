"""The statistics of two models' outputs, as llama.cpp, ggml and vLLM define them.

Where this sits: under compare.py (two files) and kld_report.py (llama-perplexity's
KL-divergence block); plain NumPy on rows of logits or log-probabilities, float64.
In every function `a` is the base (expected) side and `b` the side under test.
"""

from __future__ import annotations

import numpy as np

# llama-perplexity's percentiles of the KLD, top to bottom (fraction of the sorted values)
KLD_PERCENTILES = (
    ("Maximum", 1.0),
    ("99.9%", 0.999),
    ("99.0%", 0.99),
    ("95.0%", 0.95),
    ("90.0%", 0.9),
    ("Median", 0.5),
    ("10.0%", 0.1),
    (" 5.0%", 0.05),
    (" 1.0%", 0.01),
    (" 0.1%", 0.001),
    ("Minimum", 0.0),
)
# ... and of Δp, which adds the quartiles
DP_PERCENTILES = (
    KLD_PERCENTILES[:5]
    + (("75.0%", 0.75), ("Median", 0.5), ("25.0%", 0.25))
    + (KLD_PERCENTILES[6:])
)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64[R, V]: log p = x - max(x) - log(sum(exp(x - max(x)))), row by row."""
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kld(logp_a: np.ndarray, logp_b: np.ndarray, floor: float = -np.inf) -> np.ndarray:
    """float64[R]: KL(P_a || P_b) = sum_v p_a(v) (log p_a(v) - log p_b(v)), per row.

    Terms with log p_a(v) <= floor are left out: llama.cpp uses floor = -16 on its
    16-bit base files, whose smallest entries are clipped (kld_file.py)."""
    keep = logp_a > floor
    terms = np.where(keep, np.exp(logp_a) * (logp_a - logp_b), 0.0)
    return terms.sum(axis=-1)


def nmse(a: np.ndarray, b: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """ggml's normalised mean squared error (test-backend-ops): mse(a, b) / mse(a, 0)
    = sum (a - b)^2 / sum a^2, over `axis` (all elements when None)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.square(a - b).sum(axis=axis) / np.square(a).sum(axis=axis)


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation between the sorted values at
    fraction * (n - 1); 0 is the minimum, 0.5 the median, 1 the maximum."""
    return float(np.quantile(values, fraction, method="linear"))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """(mean, its standard error) as llama-perplexity states them:

    f = mean(x),  df = sqrt((mean(x^2) - f^2) / (n - 1))   (0 when n <= 10)
    """
    n = len(values)
    f = float(np.mean(values))
    var = float(np.mean(np.square(values))) - f * f
    return f, float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0


def top_k_contains(token: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
    """bool[R]: is token[r] among the k largest entries of logits[r]? (vLLM's
    check_logprobs_close asks this of each side's token in the other's top-k logprobs.)"""
    rank = (logits > logits[np.arange(len(token)), token][:, None]).sum(axis=-1)
    return rank < k
