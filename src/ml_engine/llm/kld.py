"""The statistics of llama.cpp's ``llama-perplexity --kl-divergence``, from per-position scores.

Every scored position contributes its negative log-likelihood of the actual next token under
the file (``nll``) and under the base (``nll_base``), KL(base ‖ file) summed over the whole
vocabulary, Δp (the file's probability of the actual next token minus the base's) and whether
both put the same token on top. The summaries follow perplexity.cpp's definitions:

- a mean's ± is ``sqrt((mean of squares − square of mean) / (n − 1))``, and unknown (None here,
  0 there) for n ≤ 10; a PPL's ± is PPL × the ± of the mean ln-likelihood;
- the covariance of the two ln-likelihoods is ``(mean of products − product of means) / (n − 1)``
  (unknown for n < 10); Cor(ln PPL(Q), ln PPL(base)) divides it by the two ±;
- ln(PPL(Q)/PPL(base)) has ± ``sqrt(σ_Q² + σ_base² − 2 cov)``, the ratio ``ratio × that``;
- RMS Δp is the square root of the mean Δp², its ± half the ± of that mean over RMS;
- "same top p" is the share of positions with the same top token, ± ``sqrt(p(1 − p)/(n − 1))``;
- percentiles interpolate linearly between sorted values at ``fraction × (n − 1)``.

One difference, on purpose: llama.cpp stores the base's log-probabilities as 16-bit integers
over the 16 nats below the top one and skips base probabilities under e^-16 in the KL sum; we
keep float32 log-probabilities and sum over every token, so the KL here is the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# (row-name suffix, fraction) in the order llama.cpp prints them
KL_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p99_9", 0.999),
    ("p99", 0.99),
    ("p95", 0.95),
    ("p90", 0.90),
    ("median", 0.5),
    ("p10", 0.10),
    ("p5", 0.05),
    ("p1", 0.01),
    ("p0_1", 0.001),
)
DP_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p99_9", 0.999),
    ("p99", 0.99),
    ("p95", 0.95),
    ("p90", 0.90),
    ("p75", 0.75),
    ("median", 0.5),
    ("p25", 0.25),
    ("p10", 0.10),
    ("p5", 0.05),
    ("p1", 0.01),
    ("p0_1", 0.001),
)
# too few positions for a spread (perplexity.cpp reports 0 below this; we report None)
MIN_COUNT_FOR_SPREAD = 11
MIN_COUNT_FOR_COVARIANCE = 10


@dataclass(frozen=True)
class PositionScores:
    """One value per scored position (all arrays of the same length)."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_diff: np.ndarray
    same_top: np.ndarray

    @staticmethod
    def concatenate(parts: Iterable[PositionScores]) -> PositionScores:
        parts = list(parts)
        return PositionScores(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS)
        )

    def __len__(self) -> int:
        return int(self.nll.shape[0])


_FIELDS = ("nll", "nll_base", "kld", "p_diff", "same_top")


def score_positions(
    logprobs: np.ndarray, base_logprobs: np.ndarray, targets: np.ndarray
) -> PositionScores:
    """Scores of each row: ``logprobs`` and ``base_logprobs`` are ``positions × vocab``
    log-softmaxes of the file and of the base, ``targets`` the actual next tokens."""
    if logprobs.shape != base_logprobs.shape:
        raise ValueError(f"shape mismatch: {logprobs.shape} vs base {base_logprobs.shape}")
    quant = logprobs.astype(np.float64, copy=False)
    base = base_logprobs.astype(np.float64, copy=False)
    rows = np.arange(len(targets))
    targets = np.asarray(targets)
    nll = -quant[rows, targets]
    nll_base = -base[rows, targets]
    kld = np.sum(np.exp(base) * (base - quant), axis=-1)
    return PositionScores(
        nll=nll,
        nll_base=nll_base,
        kld=kld,
        p_diff=np.exp(-nll) - np.exp(-nll_base),
        same_top=quant.argmax(-1) == base.argmax(-1),
    )


def own_scores(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The negative log-likelihoods alone, for a file with nothing to compare against."""
    return -logprobs[np.arange(len(targets)), np.asarray(targets)].astype(np.float64)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and its ± as perplexity.cpp computes them (None: no values / too few for a ±)."""
    n = len(values)
    if n < 1:
        return None, None
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.sum() / n)
    variance = float((values * values).sum() / n - mean * mean)
    if n < MIN_COUNT_FOR_SPREAD:
        return mean, None
    return mean, math.sqrt(variance / (n - 1)) if variance > 0 else 0.0


def covariance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Covariance of the two means, as perplexity.cpp computes it for the ln-likelihoods."""
    n = len(a)
    if n < MIN_COUNT_FOR_COVARIANCE:
        return None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation at ``fraction × (n − 1)`` of ascending ``sorted_values``."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    position = fraction * (len(sorted_values) - 1)
    low = int(position)
    weight = position - low
    high = min(low + 1, len(sorted_values) - 1)
    return float((1 - weight) * sorted_values[low] + weight * sorted_values[high])


def perplexity_of(nll: np.ndarray) -> dict[str, float | None]:
    """``perplexity`` and ``perplexity_unc`` of negative log-likelihoods."""
    mean, unc = mean_and_uncertainty(nll)
    if mean is None:
        return {"perplexity": None, "perplexity_unc": None}
    ppl = math.exp(mean)
    return {"perplexity": ppl, "perplexity_unc": None if unc is None else ppl * unc}


def _times(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a * b


def kl_statistics(scores: PositionScores) -> dict[str, float | None]:
    """Every figure perplexity.cpp prints after ``--kl-divergence``, keyed as in result.json."""
    n = len(scores)
    stats: dict[str, float | None] = {"positions": n}
    log_q, unc_q = mean_and_uncertainty(scores.nll)
    log_b, unc_b = mean_and_uncertainty(scores.nll_base)
    stats.update(perplexity_of(scores.nll))
    base = perplexity_of(scores.nll_base)
    stats["perplexity_base"], stats["perplexity_base_unc"] = (
        base["perplexity"],
        base["perplexity_unc"],
    )
    cov = covariance(scores.nll, scores.nll_base)
    spread_known = unc_q is not None and unc_b is not None and cov is not None
    stats["ln_ppl_correlation"] = (
        cov / (unc_q * unc_b) if spread_known and unc_q > 0 and unc_b > 0 else None
    )
    ln_ratio = None if log_q is None or log_b is None else log_q - log_b
    ln_ratio_unc = math.sqrt(max(unc_q**2 + unc_b**2 - 2 * cov, 0.0)) if spread_known else None
    stats["ln_ppl_ratio"], stats["ln_ppl_ratio_unc"] = ln_ratio, ln_ratio_unc
    ratio = None if ln_ratio is None else math.exp(ln_ratio)
    stats["ppl_ratio"], stats["ppl_ratio_unc"] = ratio, _times(ratio, ln_ratio_unc)
    ppl_q, ppl_b = stats["perplexity"], stats["perplexity_base"]
    stats["ppl_diff"] = None if ppl_q is None or ppl_b is None else ppl_q - ppl_b
    stats["ppl_diff_unc"] = (
        math.sqrt(
            max(
                stats["perplexity_unc"] ** 2
                + stats["perplexity_base_unc"] ** 2
                - 2 * ppl_q * ppl_b * cov,
                0.0,
            )
        )
        if spread_known
        else None
    )

    stats["kl_mean"], stats["kl_mean_unc"] = mean_and_uncertainty(scores.kld)
    stats.update(_distribution("kl", scores.kld, KL_PERCENTILES))
    stats["dp_mean"], stats["dp_mean_unc"] = mean_and_uncertainty(scores.p_diff)
    stats.update(_distribution("dp", scores.p_diff, DP_PERCENTILES))
    mse, mse_unc = mean_and_uncertainty(scores.p_diff**2)
    rms = None if mse is None else math.sqrt(mse)
    stats["dp_rms"] = rms
    stats["dp_rms_unc"] = None if mse_unc is None or not rms else 0.5 / rms * mse_unc

    same = float(np.count_nonzero(scores.same_top) / n) if n else None
    stats["top1_agreement"] = same
    stats["top1_agreement_unc"] = (
        math.sqrt(same * (1 - same) / (n - 1)) if same is not None and n > 1 else None
    )
    return stats


def _distribution(
    prefix: str, values: np.ndarray, fractions: tuple[tuple[str, float], ...]
) -> dict[str, float | None]:
    """``<prefix>_max``, the percentiles (the median as llama.cpp takes it), ``<prefix>_min``."""
    if len(values) == 0:
        names = ["max", *(name for name, _ in fractions), "min"]
        return {f"{prefix}_{name}": None for name in names}
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    out: dict[str, float | None] = {f"{prefix}_max": float(ordered[-1])}
    for name, fraction in fractions:
        out[f"{prefix}_{name}"] = percentile(ordered, fraction)
    out[f"{prefix}_min"] = float(ordered[0])
    return out
