"""What the UI draws: a run's loss/accuracy curves and a sweep's summary, read from run dirs.

Everything here reads files the training and sweep code already wrote, under directories the
server was configured with; names that come from a request are checked to be one plain
directory name first, so no request can reach a path of its choosing.
"""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ml_engine.run.helpers import finite_or_none
from ml_engine.run.study_plots import INDEX_JSON as STUDY_INDEX
from ml_engine.run.study_plots import PLOTLY_JS, STUDY_DIR
from ml_engine.training.progress import CURVES_FILE, STEP_SUFFIX

# one directory name: what run and sweep dirs are called (timestamps, run ids, dots, dashes)
_DIR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# a curve longer than this is thinned for the page (every k-th point, the last always kept)
MAX_POINTS = 2000
SUMMARY_JSON, SUMMARY_PNG = "summary.json", "summary.png"
CSV_METRICS = "metrics.csv"
# LearningRateMonitor's series (lr-AdamW, lr-SGD-momentum, ...): logged at the step the
# schedule has reached (every log_every_n_steps for a per-step schedule, conf lr_monitor), a
# block of their own ("lr") beside the per-step losses, whose steps they mostly miss
LR_PREFIX = "lr-"
KINDS = ("step", "epoch", "lr")


def _kind(name: str) -> str:
    if name.startswith(LR_PREFIX):
        return "lr"
    return "step" if name.endswith(STEP_SUFFIX) else "epoch"


def is_dir_name(name: str) -> bool:
    return bool(_DIR_NAME.fullmatch(name)) and ".." not in name


def child_dir(parent: Path, name: str) -> Path | None:
    """``parent/name`` when ``name`` is one plain directory name and that directory exists."""
    if not is_dir_name(name):
        return None
    path = parent / name
    return path if path.is_dir() and path.resolve().parent == parent.resolve() else None


# ---- curves -------------------------------------------------------------------------------


def _aligned(points: dict[int, dict[str, float]]) -> dict[str, Any]:
    """uPlot's shape: one x array and one array per series, ``None`` where a series has no
    value at that x."""
    xs = sorted(points)
    names = sorted({name for values in points.values() for name in values})
    if len(xs) > MAX_POINTS:
        stride = -(-len(xs) // MAX_POINTS)
        xs = xs[::stride] + ([xs[-1]] if (len(xs) - 1) % stride else [])
    return {"x": xs, "series": {n: [points[x].get(n) for x in xs] for n in names}}


def _from_progress(run_dir: Path) -> dict[str, dict[int, dict[str, float]]] | None:
    try:
        lines = (run_dir / CURVES_FILE).read_text().splitlines()
    except OSError:
        return None
    points: dict[str, dict[int, dict[str, float]]] = {kind: {} for kind in KINDS}
    for line in lines:
        try:
            point = json.loads(line)
            kind, x, metrics = point["kind"], int(point["x"]), dict(point["metrics"])
        except (ValueError, KeyError, TypeError):
            continue  # the line being written right now, or a foreign one
        if kind in points:
            values = {k: v for k, v in metrics.items() if finite_or_none(v) is not None}
            points[kind].setdefault(x, {}).update(values)
    return points


def _from_csv(run_dir: Path) -> dict[str, dict[int, dict[str, float]]] | None:
    """The CSV logger's ``csv/version_*/metrics.csv`` (the newest version): rows with a
    ``*_step`` value are step points, ``lr-*`` learning-rate points (by step), the others
    epoch points (its epochs count from 0)."""
    files = sorted(run_dir.glob(f"csv/version_*/{CSV_METRICS}"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    points: dict[str, dict[int, dict[str, float]]] = {kind: {} for kind in KINDS}
    with files[-1].open(newline="") as handle:
        for row in csv.DictReader(handle):
            # hp/* repeat the final metrics for TensorBoard's HParams view: not a curve
            values = {
                k: float(v)
                for k, v in row.items()
                if k not in ("epoch", "step") and not k.startswith("hp/") and v not in ("", None)
            }
            values = {k: v for k, v in values.items() if finite_or_none(v) is not None}
            step = {k: v for k, v in values.items() if _kind(k) == "step"}
            rates = {k: v for k, v in values.items() if _kind(k) == "lr"}
            epoch = {
                k: v for k, v in values.items() if _kind(k) == "epoch" and not k.endswith("_best")
            }
            for kind, found in (("step", step), ("lr", rates)):
                if found and row.get("step"):
                    points[kind].setdefault(int(float(row["step"])), {}).update(found)
            if epoch and row.get("epoch") and not any(k.startswith("test/") for k in epoch):
                points["epoch"].setdefault(int(float(row["epoch"])) + 1, {}).update(epoch)
    return points


def _from_tensorboard(run_dir: Path) -> dict[str, dict[int, dict[str, float]]] | None:
    """The TensorBoard logger's event files under ``tensorboard/`` (a ``python train.py`` run's
    default logger), read with TensorBoard's own reader: ``*_step`` tags are step points,
    ``lr-*`` learning-rate points (by step); the others become epoch points through
    Lightning's ``epoch`` scalar logged at the same step."""
    folder = run_dir / "tensorboard"
    files = sorted(folder.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    events = EventAccumulator(str(files[-1].parent), size_guidance={SCALARS: 0})
    events.Reload()
    tags = events.Tags().get("scalars", [])
    epoch_at = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else {}
    points: dict[str, dict[int, dict[str, float]]] = {kind: {} for kind in KINDS}
    for tag in tags:
        if tag == "epoch" or tag.startswith(("hp/", "test/")) or tag.endswith("_best"):
            continue
        for event in events.Scalars(tag):
            if finite_or_none(event.value) is None:
                continue
            if _kind(tag) != "epoch":
                points[_kind(tag)].setdefault(event.step, {})[tag] = float(event.value)
            elif event.step in epoch_at:
                points["epoch"].setdefault(epoch_at[event.step] + 1, {})[tag] = float(event.value)
    return points


def read_curves(run_dir: Path) -> dict[str, Any]:
    """A run's per-step, per-epoch and learning-rate series, from the job progress callback's
    ``curves.jsonl``, else the CSV logger's file, else the TensorBoard logger's event files;
    empty series when none exists."""
    readers = (("progress", _from_progress), ("csv", _from_csv))
    for source, reader in (*readers, ("tensorboard", _from_tensorboard)):
        try:
            points = reader(run_dir)
        except (OSError, ValueError):
            points = None
        if points is not None:
            return {"source": source, **{kind: _aligned(p) for kind, p in points.items()}}
    return {"source": None, **{kind: _aligned({}) for kind in KINDS}}


# ---- sweeps -------------------------------------------------------------------------------


def _read_summary(sweep_dir: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((sweep_dir / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("jobs"), list):
        return None
    return summary


def _stamp(path: Path) -> str:
    moment = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    return moment.isoformat(timespec="seconds")


def find_sweeps(roots: dict[str, Path]) -> list[dict[str, Any]]:
    """Every sweep dir holding a ``summary.json`` under the configured roots (kind → dir),
    newest first."""
    found = []
    for kind, root in roots.items():
        if not root.is_dir():
            continue
        for path in root.glob(f"*/{SUMMARY_JSON}"):
            sweep_dir = path.parent
            summary = _read_summary(sweep_dir)
            if summary is None or not is_dir_name(sweep_dir.name):
                continue
            found.append(
                {
                    "name": sweep_dir.name,
                    "kind": kind,
                    "metric": summary.get("metric"),
                    "jobs": len(summary["jobs"]),
                    "has_plot": (sweep_dir / SUMMARY_PNG).is_file(),
                    "date": _stamp(path),
                }
            )
    return sorted(found, key=lambda s: s["date"], reverse=True)


def sweep_dir_named(roots: dict[str, Path], name: str) -> tuple[str, Path] | None:
    for kind, root in roots.items():
        found = child_dir(root, name)
        if found is not None and (found / SUMMARY_JSON).is_file():
            return kind, found
    return None


def _sort_key(record: dict[str, Any], metric: str, sign: float) -> tuple[int, float, str]:
    """Best first; failed jobs and jobs without the metric last, as ``summary.md`` ranks them."""
    value = finite_or_none((record.get("metrics") or {}).get(metric))
    usable = record.get("status") == "ok" and value is not None
    return (0 if usable else 1, sign * value if usable else 0.0, str(record.get("job", "")))


def sweep_rows(sweep_dir: Path) -> dict[str, Any] | None:
    """summary.json's jobs as flat rows sorted by its metric: the mode it records (max when
    absent, what the training sweeps use), job, overrides, status, metric, error."""
    summary = _read_summary(sweep_dir)
    if summary is None:
        return None
    metric = str(summary.get("metric") or "")
    mode = summary.get("mode") if summary.get("mode") in ("max", "min") else "max"
    records = [r for r in summary["jobs"] if isinstance(r, dict)]
    records.sort(key=lambda r: _sort_key(r, metric, -1.0 if mode == "max" else 1.0))
    rows = [
        {
            "job": str(r.get("job", "")),
            "overrides": " ".join(str(o) for o in r.get("overrides") or []),
            "status": str(r.get("status", "failed")),
            "value": finite_or_none((r.get("metrics") or {}).get(metric)),
            "error": str(r.get("error") or ""),
        }
        for r in records
    ]
    return {"metric": metric, "mode": mode, "rows": rows}


# ---- a sweep's study plots ----------------------------------------------------------------

# what a study folder may serve, by suffix: the pages, their pictures and their plotly.js
STUDY_MEDIA = {".png": "image/png", ".html": "text/html", ".js": "text/javascript"}


def _study_file_name(value: Any, suffix: str) -> str | None:
    """``value`` when it is one plain file name with ``suffix``, as write_study_plots writes."""
    name = str(value) if isinstance(value, str) else ""
    return name if is_dir_name(name) and name.endswith(suffix) else None


def study_plots(sweep_dir: Path) -> list[dict[str, str]]:
    """The plots ``study/index.json`` lists (name, title, html, png file names); entries whose
    files are not plain names in that folder are left out, as is a missing or broken index."""
    try:
        index = json.loads((sweep_dir / STUDY_DIR / STUDY_INDEX).read_text())
        entries = index["plots"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    plots = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        html, png = (
            _study_file_name(entry.get("html"), ".html"),
            _study_file_name(entry.get("png"), ".png"),
        )
        if html and png:
            plots.append(
                {
                    "name": str(entry.get("name", "")),
                    "title": str(entry.get("title", "")),
                    "html": html,
                    "png": png,
                }
            )
    return plots


def study_file(sweep_dir: Path, name: str) -> Path | None:
    """A file of ``<sweep_dir>/study/`` that index.json lists (or the pages' plotly.min.js),
    when it exists as a regular file right in that folder; None for anything else."""
    listed = {PLOTLY_JS} | {p[kind] for p in study_plots(sweep_dir) for kind in ("html", "png")}
    if name not in listed:
        return None
    folder = sweep_dir / STUDY_DIR
    path = folder / name
    if path.is_symlink() or not path.is_file() or path.resolve().parent != folder.resolve():
        return None
    return path
