"""One summary table per sweep, built from the ``job.json`` every job leaves in its dir.

Shared by training and generation sweeps: a Hydra callback runs it when the sweep ends, whatever
the sweeper (grid, Optuna) or launcher, and failed jobs appear as ``failed`` rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ml_engine.cli import JOB_RECORD, write_json_atomic


def read_job_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's record under ``sweep_dir``, with the job's dir name as ``job``."""
    records = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_RECORD}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            record = {"status": "failed", "error": f"unreadable {JOB_RECORD}: {exc}", "metrics": {}}
        record["job"] = path.parent.name
        records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def rank_records(records: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first by ``metric`` (``mode`` max or min); failed jobs and missing values last."""
    sign = -1.0 if mode == "max" else 1.0

    def key(record: dict[str, Any]) -> tuple[int, float, str]:
        value = _number(record.get("metrics", {}).get(metric))
        usable = record.get("status") == "ok" and value is not None
        return (0 if usable else 1, sign * value if usable else 0.0, record["job"])

    return sorted(records, key=key)


def summary_rows(
    records: list[dict[str, Any]], metric: str, columns: Sequence[str]
) -> list[dict[str, Any]]:
    """Flat rows: job, overrides, status, the monitored metric, the chosen columns, error."""
    rows = []
    for record in records:
        metrics = record.get("metrics") or {}
        row: dict[str, Any] = {
            "job": record["job"],
            "overrides": " ".join(record.get("overrides") or []),
            "status": record.get("status", "failed"),
            metric: metrics.get(metric),
        }
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
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["job"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


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

    def __init__(self, metric: str, mode: str = "max", columns: Sequence[str] = ()) -> None:
        self.metric, self.mode, self.columns = metric, mode, list(columns)

    def write(self, sweep_dir: Path) -> Path:
        records = rank_records(read_job_records(sweep_dir), self.metric, self.mode)
        rows = summary_rows(records, self.metric, self.columns)
        write_csv(rows, sweep_dir / "summary.csv")
        title = f"# Sweep summary: {sweep_dir.name}\n\nSorted by `{self.metric}` ({self.mode}).\n\n"
        (sweep_dir / "summary.md").write_text(title + markdown_table(rows))
        write_json_atomic(sweep_dir / "summary.json", {"metric": self.metric, "jobs": records})
        self.extra_outputs(sweep_dir, records)
        return sweep_dir / "summary.md"

    def extra_outputs(self, sweep_dir: Path, records: list[dict[str, Any]]) -> None:
        """Hook for sweep kinds that add more views of the same records (plots)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = self.write(Path(config.hydra.sweep.dir))
        print(f"summary: {path}", flush=True)
