"""llama-perplexity's --kl-divergence statistics, checked against plain Python written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml_engine.llm.kld import (
    DP_PERCENTILES,
    KL_PERCENTILES,
    PositionScores,
    kl_statistics,
    percentile,
    score_positions,
)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _synthetic(n: int = 400, vocab: int = 40, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, vocab)) * 3
    base = _log_softmax(logits)
    quant = _log_softmax(logits + rng.standard_normal((n, vocab)) * noise)
    targets = np.array([rng.choice(vocab, p=np.exp(row)) for row in base])
    return quant, base, targets


def _mean_pm(values: list[float]) -> tuple[float, float]:
    """Mean and the standard error as perplexity.cpp prints it: population std / sqrt(n - 1)."""
    n = len(values)
    mean = sum(values) / n
    population_var = sum((v - mean) ** 2 for v in values) / n
    return mean, math.sqrt(population_var / (n - 1))


def _interpolated(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _reference(quant: np.ndarray, base: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The statistics, one position at a time, in plain Python floats."""
    n, vocab = quant.shape
    q, b = quant.tolist(), base.tolist()
    nll = [-q[i][targets[i]] for i in range(n)]
    nll_base = [-b[i][targets[i]] for i in range(n)]
    kld = [sum(math.exp(b[i][v]) * (b[i][v] - q[i][v]) for v in range(vocab)) for i in range(n)]
    dp = [math.exp(-nll[i]) - math.exp(-nll_base[i]) for i in range(n)]
    same = [
        max(range(vocab), key=q[i].__getitem__) == max(range(vocab), key=b[i].__getitem__)
        for i in range(n)
    ]

    mean_q, se_q = _mean_pm(nll)
    mean_b, se_b = _mean_pm(nll_base)
    diffs = [a - c for a, c in zip(nll, nll_base, strict=True)]
    _, se_diff = _mean_pm(diffs)  # the ± of ln(PPL(Q)/PPL(base)) is that of the differences
    cov_num = sum((a - mean_q) * (c - mean_b) for a, c in zip(nll, nll_base, strict=True))
    correlation = cov_num / math.sqrt(
        sum((a - mean_q) ** 2 for a in nll) * sum((c - mean_b) ** 2 for c in nll_base)
    )
    squares = [d * d for d in dp]
    mse, se_mse = _mean_pm(squares)
    top = sum(same) / n
    out = {
        "perplexity": math.exp(mean_q),
        "perplexity_unc": math.exp(mean_q) * se_q,
        "perplexity_base": math.exp(mean_b),
        "perplexity_base_unc": math.exp(mean_b) * se_b,
        "ln_ppl_correlation": correlation,
        "ln_ppl_ratio": mean_q - mean_b,
        "ln_ppl_ratio_unc": se_diff,
        "ppl_ratio": math.exp(mean_q - mean_b),
        "ppl_ratio_unc": math.exp(mean_q - mean_b) * se_diff,
        "ppl_diff": math.exp(mean_q) - math.exp(mean_b),
        "kl_mean": _mean_pm(kld)[0],
        "kl_mean_unc": _mean_pm(kld)[1],
        "kl_max": max(kld),
        "kl_min": min(kld),
        "dp_mean": _mean_pm(dp)[0],
        "dp_mean_unc": _mean_pm(dp)[1],
        "dp_max": max(dp),
        "dp_min": min(dp),
        "dp_rms": math.sqrt(mse),
        "dp_rms_unc": 0.5 / math.sqrt(mse) * se_mse,
        "top1_agreement": top,
        "top1_agreement_unc": math.sqrt(top * (1 - top) / (n - 1)),
    }
    for name, fraction in KL_PERCENTILES:
        out[f"kl_{name}"] = _interpolated(kld, fraction)
    for name, fraction in DP_PERCENTILES:
        out[f"dp_{name}"] = _interpolated(dp, fraction)
    return out


def test_statistics_match_a_position_by_position_reference() -> None:
    quant, base, targets = _synthetic()
    stats = kl_statistics(score_positions(quant, base, targets))
    expected = _reference(quant, base, targets)
    assert stats["positions"] == len(targets)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert set(stats) >= set(expected) | {"ppl_diff_unc"}


def test_the_ppl_difference_uncertainty_uses_the_covariance() -> None:
    quant, base, targets = _synthetic(seed=3)
    scores = score_positions(quant, base, targets)
    stats = kl_statistics(scores)
    n = len(targets)
    ppl_q, ppl_b = stats["perplexity"], stats["perplexity_base"]
    # the first-order error of exp(x) - exp(y): the per-position values of ppl_q·nll - ppl_b·nll_b
    combined = ppl_q * scores.nll - ppl_b * scores.nll_base
    assert stats["ppl_diff_unc"] == pytest.approx(np.std(combined) / math.sqrt(n - 1), rel=1e-9)


def test_the_median_is_the_middle_pair_and_percentiles_are_ordered() -> None:
    quant, base, targets = _synthetic(n=300, seed=1)
    stats = kl_statistics(score_positions(quant, base, targets))
    scores = score_positions(quant, base, targets)
    ordered = np.sort(scores.kld)
    assert stats["kl_median"] == pytest.approx((ordered[149] + ordered[150]) / 2)
    kl_order = ["kl_max", *(f"kl_{n}" for n, _ in KL_PERCENTILES), "kl_min"]
    dp_order = ["dp_max", *(f"dp_{n}" for n, _ in DP_PERCENTILES), "dp_min"]
    for order in (kl_order, dp_order):
        values = [stats[key] for key in order]
        assert values == sorted(values, reverse=True), order
    assert stats["kl_min"] >= 0  # a KL divergence is never negative
    assert percentile(np.array([1.0, 2.0, 4.0]), 0.75) == pytest.approx(3.0)
    assert percentile(np.array([1.0, 2.0, 4.0]), 0.0) == 1.0
    assert percentile(np.array([1.0, 2.0, 4.0]), 1.0) == 4.0


def test_identical_files_agree_perfectly() -> None:
    _, base, targets = _synthetic(n=50)
    stats = kl_statistics(score_positions(base, base, targets))
    assert stats["kl_mean"] == pytest.approx(0, abs=1e-12) and stats["kl_max"] == pytest.approx(
        0, abs=1e-12
    )
    assert stats["top1_agreement"] == 1 and stats["top1_agreement_unc"] == 0
    assert stats["ppl_ratio"] == pytest.approx(1) and stats["ln_ppl_correlation"] == pytest.approx(
        1
    )
    assert stats["dp_rms"] == 0 and stats["dp_rms_unc"] is None


def test_too_few_positions_have_no_uncertainty() -> None:
    quant, base, targets = _synthetic(n=8)
    stats = kl_statistics(score_positions(quant, base, targets))
    # perplexity.cpp gives no spread below 11 values (nor a covariance below 10): None, not 0
    assert stats["kl_mean"] > 0 and stats["kl_mean_unc"] is None
    assert stats["perplexity_unc"] is None and stats["ln_ppl_correlation"] is None
    assert stats["ppl_ratio"] > 0 and stats["ppl_ratio_unc"] is None


def test_scores_of_chunks_concatenate() -> None:
    quant, base, targets = _synthetic(n=40)
    whole = score_positions(quant, base, targets)
    parts = PositionScores.concatenate(
        [
            score_positions(quant[:15], base[:15], targets[:15]),
            score_positions(quant[15:], base[15:], targets[15:]),
        ]
    )
    assert len(parts) == 40
    assert kl_statistics(parts) == pytest.approx(kl_statistics(whole))
