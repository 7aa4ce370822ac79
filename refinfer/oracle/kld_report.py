"""llama-perplexity's KL-divergence block: a model's logits against a base file's log-probs.

Where this sits: perplexity.py feeds it, chunk by chunk, the model's logits of the
scored positions with the base file's decoded log-probs (kld_file.py) and the true
next tokens; it keeps the per-position values and prints llama.cpp's statistics,
with its names and layout (kl_divergence() in tools/perplexity/perplexity.cpp):

    nll      = -log q(next)                 nll_base = -log p(next)
    KLD      = sum_v p(v) (log p(v) - log q(v)), over log p(v) > -16 (the stored ones)
    Δp       = q(next) - p(next)             Same top p: argmax q == argmax p
    PPL(Q) = exp(mean nll), PPL(base) = exp(mean nll_base), each +- PPL * stderr(nll)

p is the base, q the model being measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refinfer.oracle.kld_file import CLIP
from refinfer.oracle.stats import (
    DP_PERCENTILES,
    KLD_PERCENTILES,
    kld,
    log_softmax,
    mean_and_uncertainty,
    percentile,
)

MIN_POSITIONS = 100  # llama.cpp prints no statistics over fewer positions


@dataclass
class KLDReport:
    """Per-position values of every chunk so far; the statistics are computed from them."""

    nll: list[np.ndarray] = field(default_factory=list)  # float64[S] per chunk
    nll_base: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    p_diff: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)  # bool[S]

    def add_chunk(self, logits: np.ndarray, base_log_probs: np.ndarray, nxt: np.ndarray):
        """The model's logits[S, V], the base's log p[S, V] and the next tokens int[S]."""
        logq, logp = log_softmax(logits), base_log_probs.astype(np.float64)
        rows = np.arange(len(nxt))
        self.nll.append(-logq[rows, nxt])
        self.nll_base.append(-logp[rows, nxt])
        self.kld.append(kld(logp, logq, floor=-CLIP))
        self.p_diff.append(np.exp(-self.nll[-1]) - np.exp(-self.nll_base[-1]))
        self.same_top.append(logits.argmax(axis=-1) == logp.argmax(axis=-1))

    def values(self) -> dict[str, np.ndarray]:
        """The per-position arrays, all chunks concatenated."""
        names = ("nll", "nll_base", "kld", "p_diff", "same_top")
        return {n: np.concatenate(getattr(self, n)) for n in names}

    def summary(self) -> dict:
        """llama.cpp's figures: PPL(Q), PPL(base), their correlation, ratio and difference,
        the KLD and Δp mean and percentiles, RMS Δp and Same top p, each with its +-."""
        v = self.values()
        n = len(v["kld"])
        (lq, dlq), (lp, dlp) = mean_and_uncertainty(v["nll"]), mean_and_uncertainty(v["nll_base"])
        # cov(ln PPL(Q), ln PPL(base)) = (mean(nll nll_base) - mean(nll) mean(nll_base)) / (n - 1)
        cov = (np.mean(v["nll"] * v["nll_base"]) - lq * lp) / (n - 1) if n >= 10 else 0.0
        ratio_unc = float(np.sqrt(dlq**2 + dlp**2 - 2 * cov))
        ppl, ppl_base = np.exp(lq), np.exp(lp)
        mse, dmse = mean_and_uncertainty(np.square(v["p_diff"]))
        top = float(np.mean(v["same_top"]))
        return {
            "positions": n,
            "ppl": [ppl, ppl * dlq],
            "ppl_base": [ppl_base, ppl_base * dlp],
            "ln_ppl_correlation": cov / (dlq * dlp) if dlq * dlp > 0 else 0.0,
            "ln_ppl_ratio": [lq - lp, ratio_unc],
            "ppl_ratio": [np.exp(lq - lp), np.exp(lq - lp) * ratio_unc],
            "ppl_diff": [
                ppl - ppl_base,
                float(np.sqrt((ppl * dlq) ** 2 + (ppl_base * dlp) ** 2 - 2 * ppl * ppl_base * cov)),
            ],
            "kld": list(mean_and_uncertainty(v["kld"])),
            "kld_percentiles": {k: percentile(v["kld"], f) for k, f in KLD_PERCENTILES},
            "p_diff": list(mean_and_uncertainty(v["p_diff"])),
            "p_diff_percentiles": {k: percentile(v["p_diff"], f) for k, f in DP_PERCENTILES},
            "p_diff_rms": [np.sqrt(mse), 0.5 / np.sqrt(mse) * dmse if mse > 0 else 0.0],
            "same_top_p": [top, float(np.sqrt(top * (1 - top) / (n - 1)))],
        }


def format_summary(s: dict) -> str:
    """The summary in llama-perplexity's layout and names (its three ====== blocks)."""
    lines = [
        "====== Perplexity statistics ======",
        "Mean PPL(Q)                   : {:10.6f} ± {:10.6f}".format(*s["ppl"]),
        "Mean PPL(base)                : {:10.6f} ± {:10.6f}".format(*s["ppl_base"]),
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['ln_ppl_correlation']:6.2f}%",
        "Mean ln(PPL(Q)/PPL(base))     : {:10.6f} ± {:10.6f}".format(*s["ln_ppl_ratio"]),
        "Mean PPL(Q)/PPL(base)         : {:10.6f} ± {:10.6f}".format(*s["ppl_ratio"]),
        "Mean PPL(Q)-PPL(base)         : {:10.6f} ± {:10.6f}".format(*s["ppl_diff"]),
        "",
        "====== KL divergence statistics ======",
        "Mean    KLD: {:10.6f} ± {:10.6f}".format(*s["kld"]),
        *(f"{k:<7} KLD: {x:10.6f}" for k, x in s["kld_percentiles"].items()),
        "",
        "====== Token probability statistics ======",
        "Mean    Δp: {:6.3f} ± {:5.3f} %".format(*(100 * x for x in s["p_diff"])),
        *(f"{k:<7} Δp: {100 * x:6.3f}%" for k, x in s["p_diff_percentiles"].items()),
        "RMS Δp    : {:6.3f} ± {:5.3f} %".format(*(100 * x for x in s["p_diff_rms"])),
        "Same top p: {:6.3f} ± {:5.3f} %".format(*(100 * x for x in s["same_top_p"])),
    ]
    return "\n".join(lines)
