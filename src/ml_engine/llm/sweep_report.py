"""Generation sweeps: the shared sweep summary plus ``summary.png``.

The picture puts generation tokens/s (mean ± std over the repetitions) against file size (one
mark per quantization, one series per n_gpu_layers) beside the mean KL divergence from the base
file (± as llama-perplexity computes it) against file size, so speed and quality are read
together. The speed axes start at zero so that noise does not look like a difference; jobs whose
speed is within noise of the best are marked (as in ``summary.md``). KL divergence spans orders
of magnitude between q8_0 and q2_k, hence its logarithmic axis.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.llama_bench_format import FORMATS, rows_of, write_formats
from ml_engine.llm.metrics import (
    JOB_COLUMNS,
    RANKING,
    SAMPLES,
    metric,
    metric_names,
    std_of,
    summary_columns,
)
from ml_engine.run.files import atomic_write
from ml_engine.run.helpers import finite_or_none, is_finite_number
from ml_engine.run.sweep_summary import BEST, WITHIN_NOISE, SweepSummary

log = logging.getLogger(__name__)

SPEED = metric("gen/tokens_per_s").name
SPEED_STD = metric("gen/tokens_per_s").std_name
KL = metric("quality/kl_mean").name
KL_UNC = metric("quality/kl_mean").unc_name
REFERENCE = metric("quality/reference").name
BASE = metric("quality/base_quantization").name
SIZE = metric("file_mb").name
IMATRIX = metric("imatrix").name
TENSOR_TYPES = metric("tensor_types").name
_MARKERS = "osD^v<>pPX*hH8d"


def _usable(record: dict[str, Any]) -> bool:
    metrics = record.get("metrics") or {}
    size, speed = metrics.get(SIZE), metrics.get(SPEED)
    return record.get("status") == "ok" and is_finite_number(size) and is_finite_number(speed)


def _start_at_zero(axes: Any) -> None:
    """Both axes from 0, with room on the right and top for the labels."""
    right, top = axes.get_xlim()[1], axes.get_ylim()[1]
    axes.set_xlim(0, right * 1.12 if right > 0 else 1)
    axes.set_ylim(0, top * 1.08 if top > 0 else 1)


def _std(point: dict[str, Any]) -> float:
    return finite_or_none(point.get(SPEED_STD)) or 0.0


def plot_speed_and_quality(
    records: list[dict[str, Any]], path: Path, verdicts: dict[str, str] | None = None
) -> Path:
    """Write the two-panel picture for ``records`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    figure = speed_and_quality_figure(records, verdicts)
    try:
        atomic_write(
            path, lambda handle: figure.savefig(handle, dpi=110, format="png"), binary=True
        )
    finally:
        plt.close(figure)
    return path


def speed_and_quality_figure(
    records: list[dict[str, Any]], verdicts: dict[str, str] | None = None
) -> Any:
    """The two-panel matplotlib figure for ``records`` (failed or mock jobs are left out).

    ``verdicts`` (job → ``best`` / ``within noise`` / …) marks the best job and those within
    noise of it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verdicts = verdicts or {}
    usable = [r for r in records if _usable(r)]
    points = [r["metrics"] for r in usable]
    verdict_of = {id(r["metrics"]): verdicts.get(r["job"], "") for r in usable}
    quantizations = sorted({str(p.get("quantization")) for p in points})
    marker_of = {q: _MARKERS[i % len(_MARKERS)] for i, q in enumerate(quantizations)}
    series: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for point in points:
        series[point.get("n_gpu_layers")].append(point)

    figure, (speed_ax, quality_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for layers, members in sorted(series.items(), key=lambda item: str(item[0])):
        members.sort(key=lambda p: p[SIZE])
        (line,) = speed_ax.plot(
            [p[SIZE] for p in members],
            [p[SPEED] for p in members],
            "-",
            alpha=0.5,
            label=f"n_gpu_layers={layers} ({members[0].get('compute_backend', '?')})",
        )
        for point in members:
            verdict = verdict_of[id(point)]
            speed_ax.errorbar(
                point[SIZE],
                point[SPEED],
                yerr=_std(point),
                fmt=marker_of[str(point.get("quantization"))],
                color=line.get_color(),
                markersize=8,
                capsize=4,
                # hollow: within noise of the best, so not shown to be slower
                markerfacecolor="none" if verdict == WITHIN_NOISE else line.get_color(),
            )
            tag = {BEST: " (best)", WITHIN_NOISE: " (≈ best)"}.get(verdict, "")
            speed_ax.annotate(
                f"{point.get('quantization')}{tag}",
                (point[SIZE], point[SPEED]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
    speed_ax.set_xlabel("file size (MB)")
    speed_ax.set_ylabel("generation tokens/s (wall clock), mean ± std")
    speed_ax.set_title("speed vs size")
    best = next((p for p in points if verdict_of[id(p)] == BEST), None)
    if best is not None and _std(best) > 0:
        speed_ax.axhspan(
            best[SPEED] - _std(best),
            best[SPEED] + _std(best),
            color="0.5",
            alpha=0.12,
            label="best's mean ± std",
        )
    if series:
        speed_ax.legend(fontsize=8, loc="lower left")
        figure.text(
            0.01,
            0.01,
            "Speed bars: ± 1 std over the repetitions; hollow marks, (≈ best): the interval "
            "overlaps the best's, so the difference is within noise; axes start at 0. KLD bars: "
            "± as llama-perplexity computes it; hollow KLD marks: files the imatrix gate did not "
            "keep.",
            fontsize=8,
            color="0.3",
        )
    else:
        speed_ax.text(
            0.5, 0.5, "no successful model jobs", ha="center", transform=speed_ax.transAxes
        )

    _plot_kl(quality_ax, points, marker_of)
    _start_at_zero(speed_ax)
    quality_ax.set_xlim(0, max(speed_ax.get_xlim()[1], quality_ax.get_xlim()[1]))
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return figure


def _plot_kl(axes: Any, points: list[dict[str, Any]], marker_of: dict[str, str]) -> None:
    """Mean KLD per quantization (log scale, ± bars); the base itself has none to show."""
    by_quant: dict[str, dict[str, Any]] = {}
    for point in points:
        if is_finite_number(point.get(KL)) and point[KL] > 0:
            by_quant.setdefault(_variant_label(point), point)
    for label, point in sorted(by_quant.items(), key=lambda item: item[1][SIZE]):
        marker = marker_of[str(point.get("quantization"))]
        _kl_mark(axes, point[SIZE], point[KL], point.get(KL_UNC), marker, filled=True)
        axes.annotate(
            label, (point[SIZE], point[KL]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
        _given_up(axes, point, marker)
    reference = next((p for p in points if p.get(REFERENCE)), None)
    if reference is not None and is_finite_number(reference.get(SIZE)):
        # the base has no KL of its own: its size is marked where its point would be
        axes.axvline(reference[SIZE], linestyle=":", color="0.5")
        axes.annotate(
            f"{reference.get('quantization')}: the base",
            (reference[SIZE], 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="0.3",
        )
    base = reference.get("quantization") if reference is not None else None
    base = base or next((p.get(BASE) for p in points if p.get(BASE)), None)
    axes.set_xlabel("file size (MB)")
    axes.set_ylabel(f"mean KL divergence from {base or 'the base'} (nats), ± unc.")
    axes.set_title("quality vs size (lower is better)")
    if by_quant:
        axes.set_yscale("log")
    else:
        axes.text(0.5, 0.5, "no KL divergence measured", ha="center", transform=axes.transAxes)
    right = axes.get_xlim()[1]
    axes.set_xlim(0, right * 1.12 if right > 0 else 1)


def _variant_label(point: dict[str, Any]) -> str:
    """``q4_0``, ``q4_0 +imatrix``, ``q4_k_m attn_v=q6_k``: what made the row's file."""
    label = str(point.get("quantization"))
    if point.get(TENSOR_TYPES):
        label += f" {point[TENSOR_TYPES]}"
    if point.get(IMATRIX):
        label += " +imatrix"
    return label


def _kl_mark(axes: Any, size: float, kl: float, unc: Any, marker: str, *, filled: bool) -> None:
    unc = finite_or_none(unc) or 0.0
    # a log axis has no zero: a bar reaching it stops just above
    axes.errorbar(
        size,
        kl,
        yerr=[[min(unc, kl * 0.999)], [unc]],
        fmt=marker,
        markersize=8,
        capsize=4,
        color="C3",
        markerfacecolor="C3" if filled else "none",
    )


def _given_up(axes: Any, point: dict[str, Any], marker: str) -> None:
    """With quantize.imatrix=auto, the file the gate did not keep: hollow, joined to the kept
    one by a dotted line and labelled with its own KLD."""
    kept_weighted = bool(point.get(IMATRIX))
    other = "plain" if kept_weighted else "weighted"
    kl, size = point.get(f"imatrix/kl_mean_{other}"), point.get(f"imatrix/file_mb_{other}")
    if not (is_finite_number(kl) and kl > 0 and is_finite_number(size)):
        return
    _kl_mark(axes, size, kl, point.get(f"imatrix/kl_mean_{other}_unc"), marker, filled=False)
    axes.plot([size, point[SIZE]], [kl, point[KL]], ":", color="C3", alpha=0.6)
    given_up = "without imatrix" if kept_weighted else "with imatrix"
    axes.annotate(
        f"{point.get('quantization')} {given_up} (not kept)",
        (size, kl),
        textcoords="offset points",
        # left of the mark: the kept file, at nearly the same size, is labelled on the right
        xytext=(-6, -3),
        ha="right",
        fontsize=7,
        color="0.35",
    )


def _known(what: str, names: Sequence[str], accepted: Sequence[str]) -> None:
    unknown = [name for name in names if name not in accepted]
    if unknown:
        raise UserError(
            f"hydra.callbacks.sweep_summary.{what}: {unknown[0]!r} is not a field of a "
            f"generation job; accepted: {', '.join(accepted)}"
        )


class GenerationSweepSummary(SweepSummary):
    """``SweepSummary`` for generation sweeps: same table files, plus ``summary.png``.

    Every name defaults to the declared metrics (``llm.metrics``): the columns are those marked
    ``column``, the noise verdict uses the ranked metric's std where it has one; names given
    instead must be fields of the job's row.
    """

    def __init__(
        self,
        metric: str = RANKING,
        mode: str = "max",
        columns: Sequence[str] | None = None,
        metric_std: str | None = None,
        metric_samples: str | None = SAMPLES,
    ) -> None:
        fields = metric_names()
        _known("metric", [metric], fields)
        columns = summary_columns() if columns is None else list(columns)
        _known("columns", columns, [*fields, *JOB_COLUMNS])
        metric_std = std_of(metric) if metric_std is None else metric_std
        _known("metric_std", [metric_std] if metric_std else [], fields)
        _known("metric_samples", [metric_samples] if metric_samples else [], fields)
        super().__init__(metric, mode, columns, metric_std, metric_samples)

    def extra_outputs(
        self, sweep_dir: Path, records: list[dict[str, Any]], verdicts: dict[str, str]
    ) -> None:
        try:
            plot_speed_and_quality(records, sweep_dir / "summary.png", verdicts)
        except Exception as exc:  # a missing plotting library must not lose the tables
            log.warning("summary.png not written: %s", exc)
        write_sweep_llama_bench(sweep_dir, records)


def _job_formats(job_dir: Path) -> list[str]:
    """The formats a job wrote (its ``bench.formats``), in ``FORMATS`` order."""
    return [fmt for fmt in FORMATS if (job_dir / f"llama-bench.{fmt}").is_file()]


def write_sweep_llama_bench(sweep_dir: Path, records: list[dict[str, Any]]) -> list[Path]:
    """Every job's llama-bench rows in one ``llama-bench.<fmt>`` per format the jobs wrote, in
    the order of the ranked records (failed jobs have none)."""
    rows, formats = [], []
    for record in records:
        job_dir = sweep_dir / record["job"]
        result_path = job_dir / "result.json"
        if record.get("status") != "ok" or not result_path.is_file():
            continue
        try:
            rows += rows_of(json.loads(result_path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.warning("%s: llama-bench rows not read: %s", result_path, exc)
            continue
        formats += [f for f in _job_formats(job_dir) if f not in formats]
    if not rows:
        return []
    return write_formats(sweep_dir, rows, [f for f in FORMATS if f in formats])
