"""Generation sweep summaries: which jobs are within noise of the best, and summary.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate

from ml_engine.llm.sweep_report import speed_and_quality_figure
from ml_engine.run.sweep_summary import Measurement, noise_verdicts, rank_records, within_noise
from tests.conftest import compose_config


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (Measurement(100, 10, 3), Measurement(85, 6, 3), True),  # [90, 110] ∩ [79, 91]
        (Measurement(100, 10, 3), Measurement(80, 10, 3), True),  # touching at 90
        (Measurement(100, 10, 3), Measurement(80, 9, 3), False),  # 90 > 89: apart
        (Measurement(100, 0, 3), Measurement(100, 0, 3), True),  # identical
        (Measurement(100, 0, 1), Measurement(50, 0, 3), None),  # one sample: noise unknown
        (Measurement(100, 10), Measurement(70, 10), False),  # count unknown: std as given
    ],
)
def test_within_noise_is_overlap_of_mean_plus_minus_std(a, b, expected) -> None:
    assert within_noise(a, b) is expected
    assert within_noise(b, a) is expected  # symmetric


def _record(job: str, rate: float | None, std: float | None, n: int = 6, **extra: Any) -> dict:
    metrics = {
        "gen/tokens_per_s": rate,
        "gen/tokens_per_s_std": std,
        "n_repetitions": n,
        "quantization": job,
        "n_gpu_layers": 0,
        "compute_backend": "cpu",
        "file_mb": {"f32": 40.0, "q8_0": 11.0, "q4_k_m": 7.0, "q2_k": 5.0}.get(job, 9.0),
        "quality/perplexity": 30.0,
        "quality/reference": job == "f32",
        "quality/kl_mean": {"f32": None, "q8_0": 0.002, "q4_k_m": 0.05, "q2_k": 0.8}.get(job, 0.1),
        "quality/kl_mean_unc": {"q8_0": 0.0001, "q4_k_m": 0.004, "q2_k": 0.03}.get(job, 0.2),
    }
    return {"job": job, "status": "ok", "overrides": [], "metrics": metrics, **extra}


# tokens/s as a small model on a CPU gives them: std 25-50 % of the mean
RECORDS = [
    _record("f32", 2400.0, 700.0),
    _record("q8_0", 3100.0, 900.0),  # the best
    _record("q4_k_m", 3000.0, 1200.0),  # within noise of q8_0
    _record("q2_k", 1200.0, 150.0),  # 1350 < 2200: worse
    _record("once", 1000.0, 0.0, n=1),  # measured once: its noise is unknown
    {"job": "crashed", "status": "failed", "overrides": [], "metrics": {}},
]


def test_noise_verdicts_on_constructed_records() -> None:
    ranked = rank_records(RECORDS, "gen/tokens_per_s", "max")
    verdicts = noise_verdicts(ranked, "gen/tokens_per_s", "gen/tokens_per_s_std", "n_repetitions")
    assert verdicts == {
        "q8_0": "best",
        "q4_k_m": "within noise",
        "f32": "within noise",  # 3100 - 900 = 2200 ≤ 2400 + 700
        "q2_k": "worse",  # 1200 + 150 < 2200
        "once": "",
        "crashed": "",
    }


def test_a_best_measured_once_leaves_every_verdict_open() -> None:
    records = [_record("q8_0", 3100.0, 900.0), _record("once", 5000.0, 0.0, n=1)]
    ranked = rank_records(records, "gen/tokens_per_s", "max")
    verdicts = noise_verdicts(ranked, "gen/tokens_per_s", "gen/tokens_per_s_std", "n_repetitions")
    assert verdicts == {"once": "best", "q8_0": ""}


def _write_sweep(sweep: Path, records: list[dict]) -> None:
    for record in records:
        job_dir = sweep / record["job"]
        job_dir.mkdir(parents=True)
        (job_dir / "job.json").write_text(
            json.dumps({k: v for k, v in record.items() if k != "job"})
        )


def test_sweep_summary_from_config_marks_noise_in_table_and_picture(tmp_path: Path) -> None:
    cfg = compose_config("generate")
    summary = instantiate(cfg.hydra.callbacks.sweep_summary)
    _write_sweep(tmp_path, RECORDS)
    summary_md = summary.write(tmp_path)

    with (tmp_path / "summary.csv").open() as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    assert {job: row["vs_best"] for job, row in rows.items()} == {
        "q8_0": "best",
        "q4_k_m": "within noise",
        "f32": "within noise",
        "q2_k": "worse",
        "once": "",
        "crashed": "",
    }
    text = summary_md.read_text()
    assert "| q4_k_m |" in text and "within noise" in text and "overlaps the best" in text
    png = tmp_path / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_speed_panel_has_error_bars_and_starts_at_zero() -> None:
    ranked = rank_records(RECORDS, "gen/tokens_per_s", "max")
    verdicts = noise_verdicts(ranked, "gen/tokens_per_s", "gen/tokens_per_s_std", "n_repetitions")
    figure = speed_and_quality_figure(RECORDS, verdicts)
    speed_ax, quality_ax = figure.axes
    assert speed_ax.get_ylim()[0] == 0 and speed_ax.get_xlim()[0] == 0
    assert quality_ax.get_xlim()[0] == 0 and quality_ax.get_yscale() == "log"
    assert "from f32" in quality_ax.get_ylabel()  # the reference row names the base
    kl_bars = {}
    for container in quality_ax.containers:
        ((_x, y),) = container.lines[0].get_xydata()
        low, high = container.lines[2][0].get_segments()[0][:, 1]
        kl_bars[round(float(y), 4)] = (round(float(low), 5), round(float(high), 5))
    # the base has no KL to show; a ± reaching below 0 stops just above it on the log axis
    assert kl_bars == {
        0.002: (0.0019, 0.0021),
        0.05: (0.046, 0.054),
        0.8: (0.77, 0.83),
        0.1: (0.0001, 0.3),
    }
    labels = {t.get_text() for t in quality_ax.texts}
    assert labels == {"q8_0", "q4_k_m", "q2_k", "once", "f32: the base"}
    assert speed_ax.get_ylim()[1] >= 3100 + 900  # the best's bar fits

    bars = {}  # y extent of each error bar, by the mark's centre
    for container in speed_ax.containers:
        ((_x, y),) = container.lines[0].get_xydata()
        low, high = container.lines[2][0].get_segments()[0][:, 1]
        bars[round(float(y))] = round(float(high - low) / 2)
    assert bars == {2400: 700, 3100: 900, 3000: 1200, 1200: 150, 1000: 0}
    labels = {t.get_text() for t in speed_ax.texts}
    assert {"q8_0 (best)", "q4_k_m (≈ best)", "f32 (≈ best)", "q2_k", "once"} <= labels
