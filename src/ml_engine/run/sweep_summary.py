"""One summary table per sweep, built from the ``job.json`` every job leaves in its dir.

Shared by training and generation sweeps: a Hydra callback runs it when the sweep ends, whatever
the sweeper (grid, Optuna) or launcher, and failed jobs appear as ``failed`` rows.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ml_engine.run.files import (
    JOB_RECORD,
    atomic_write,
    read_job_record,
    write_json_atomic,
    write_text_atomic,
)
from ml_engine.run.helpers import finite_or_none


def read_job_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's record under ``sweep_dir``, with the job's dir name as ``job``."""
    records = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_RECORD}")):
        record = read_job_record(path.parent)
        if record is None:
            record = {"status": "failed", "error": f"unreadable {JOB_RECORD}", "metrics": {}}
        record["job"] = path.parent.name
        records.append(record)
    return records


def rank_records(records: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first by ``metric`` (``mode`` max or min); failed jobs and missing values last."""
    sign = -1.0 if mode == "max" else 1.0

    def key(record: dict[str, Any]) -> tuple[int, float, str]:
        value = finite_or_none(record.get("metrics", {}).get(metric))
        usable = record.get("status") == "ok" and value is not None
        return (0 if usable else 1, sign * value if usable else 0.0, record["job"])

    return sorted(records, key=key)


@dataclass(frozen=True)
class Measurement:
    """A repeated measurement: mean, sample std and (where known) how many samples."""

    mean: float
    std: float
    samples: int | None = None


def within_noise(a: Measurement, b: Measurement) -> bool | None:
    """Whether ``a`` and ``b`` cannot be told apart: their mean ± std intervals overlap.

    None when either rests on a single sample (its std of 0 says nothing about the noise).
    """
    if any(m.samples is not None and m.samples < 2 for m in (a, b)):
        return None
    return abs(a.mean - b.mean) <= a.std + b.std


BEST, WITHIN_NOISE, WORSE = "best", "within noise", "worse"
NOISE_COLUMN = "vs_best"


def _measurement(record: dict[str, Any], metric: str, std: str, samples: str | None):
    metrics = record.get("metrics") or {}
    mean, spread = finite_or_none(metrics.get(metric)), finite_or_none(metrics.get(std))
    if record.get("status") != "ok" or mean is None or spread is None:
        return None
    count = metrics.get(samples) if samples else None
    return Measurement(mean, spread, int(count) if isinstance(count, int) else None)


def noise_verdicts(
    ranked: list[dict[str, Any]], metric: str, std: str, samples: str | None = None
) -> dict[str, str]:
    """Per job: ``best`` (the first ranked), ``within noise`` of it, ``worse``, or "" (unknown).

    ``ranked`` is best first (``rank_records``); jobs without a mean and std get "".
    """
    measured = [(r["job"], _measurement(r, metric, std, samples)) for r in ranked]
    measured = [(job, m) for job, m in measured if m is not None]
    verdicts = {r["job"]: "" for r in ranked}
    if not measured:
        return verdicts
    (best_job, best), *others = measured
    verdicts[best_job] = BEST
    for job, measurement in others:
        tied = within_noise(best, measurement)
        verdicts[job] = "" if tied is None else WITHIN_NOISE if tied else WORSE
    return verdicts


def summary_rows(
    records: list[dict[str, Any]],
    metric: str,
    columns: Sequence[str],
    verdicts: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Flat rows: job, overrides, status, the monitored metric (and its noise verdict when
    ``verdicts`` are given), the chosen columns, error."""
    rows = []
    for record in records:
        metrics = record.get("metrics") or {}
        row: dict[str, Any] = {
            "job": record["job"],
            "overrides": " ".join(record.get("overrides") or []),
            "status": record.get("status", "failed"),
            metric: metrics.get(metric),
        }
        if verdicts is not None:
            row[NOISE_COLUMN] = verdicts.get(record["job"], "")
        for column in columns:
            if column != metric:
                row[column] = metrics.get(column, record.get(column))
        row["error"] = record.get("error") or ""
        rows.append(row)
    return rows


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["job"])
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no jobs)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format_cell(row[c]) for c in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: writes ``summary.csv`` and ``summary.md`` (and ``summary.json``) when a
    multirun ends, then prints ``summary: <path>`` as the sweep's last line."""

    def __init__(
        self,
        metric: str,
        mode: str = "max",
        columns: Sequence[str] = (),
        metric_std: str | None = None,
        metric_samples: str | None = None,
    ) -> None:
        """``metric_std`` (and ``metric_samples``) name the metric's spread over repeated
        measurements; with it, a ``vs_best`` column says which jobs are within noise of the best."""
        self.metric, self.mode, self.columns = metric, mode, list(columns)
        self.metric_std, self.metric_samples = metric_std, metric_samples

    def verdicts(self, ranked: list[dict[str, Any]]) -> dict[str, str] | None:
        if not self.metric_std:
            return None
        return noise_verdicts(ranked, self.metric, self.metric_std, self.metric_samples)

    def write(self, sweep_dir: Path) -> Path:
        records = rank_records(read_job_records(sweep_dir), self.metric, self.mode)
        verdicts = self.verdicts(records)
        rows = summary_rows(records, self.metric, self.columns, verdicts)
        write_csv(rows, sweep_dir / "summary.csv")
        title = f"# Sweep summary: {sweep_dir.name}\n\nSorted by `{self.metric}` ({self.mode}).\n\n"
        if verdicts is not None:
            title += (
                f"`{NOISE_COLUMN}`: *{WITHIN_NOISE}* where the job's `{self.metric}` mean ± "
                f"`{self.metric_std}` overlaps the best job's, so the difference is not shown "
                "to be real; empty where a job was measured once or not at all.\n\n"
            )
        write_text_atomic(sweep_dir / "summary.md", title + markdown_table(rows))
        # the mode too: a reader (the server's sweep view) sorts by the metric the same way
        summary = {"metric": self.metric, "mode": self.mode, "jobs": records}
        write_json_atomic(sweep_dir / "summary.json", summary)
        self.extra_outputs(sweep_dir, records, verdicts or {})
        return sweep_dir / "summary.md"

    def extra_outputs(
        self, sweep_dir: Path, records: list[dict[str, Any]], verdicts: dict[str, str]
    ) -> None:
        """Hook for sweep kinds that add more views of the same records (plots)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ml_engine.run.optuna_study import study_location

        sweep_dir = Path(config.hydra.sweep.dir)
        path = self.write(sweep_dir)
        study = study_location(config)
        if study is not None:  # the whole study, whichever sweeps (workers, reruns) ran it
            table = write_study_table(sweep_dir, *study)
            write_study_views(sweep_dir, *study, metrics=_metric_names(config))
            print(f"study: {table}", flush=True)
        print(f"summary: {path}", flush=True)


def _metric_names(config: DictConfig) -> list[str]:
    metric = config.get("optimized_metric")
    return [str(m) for m in metric] if OmegaConf.is_list(metric) else [str(metric)]


def write_study_views(sweep_dir: Path, storage: str, study_name: str, metrics: list[str]) -> None:
    """The study's plots (history, importances, parallel coordinates, Pareto front) in
    ``<sweep dir>/study/``."""
    try:
        from ml_engine.run.study_plots import write_study_plots
    except ImportError:  # pragma: no cover - the plots module is optional during development
        return
    write_study_plots(sweep_dir, storage, study_name, target_names=metrics)


def write_study_table(sweep_dir: Path, storage: str, study_name: str) -> Path:
    """``study.md`` and ``study.csv``: every trial of the shared study, by trial number."""
    from ml_engine.run.optuna_study import STUDY_TABLE, study_rows

    rows = study_rows(storage, study_name)
    columns = sorted({key for row in rows for key in row}, key=_study_column_order)
    rows = [{column: row.get(column) for column in columns} for row in rows]
    write_csv(rows, sweep_dir / "study.csv")
    done = sum(1 for row in rows if row["state"] == "COMPLETE")
    pruned = sum(1 for row in rows if row["state"] == "PRUNED")
    title = (
        f"# Study `{study_name}`: {len(rows)} trials ({done} complete, {pruned} pruned)\n\n"
        f"Every trial in `{storage}`, whichever sweep ran it; this sweep's own jobs are in "
        "`summary.md`.\n\n"
    )
    write_text_atomic(sweep_dir / STUDY_TABLE, title + markdown_table(rows))
    return sweep_dir / STUDY_TABLE


def _study_column_order(column: str) -> tuple[int, str]:
    fixed = ("trial", "state", "value", "value0", "value1", "value2")
    return (
        (fixed.index(column), "")
        if column in fixed
        else (len(fixed) + (column == "started"), column)
    )
