"""Generation sweeps: the shared sweep summary plus ``summary.png``.

The picture puts generation tokens/s against file size (one mark per quantization, one series
per n_gpu_layers) beside perplexity against file size, so speed and quality are read together.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ml_engine.summary import SweepSummary

log = logging.getLogger(__name__)

SPEED = "gen/tokens_per_s"
PERPLEXITY = "quality/perplexity"
SIZE = "file_mb"
_MARKERS = "osD^v<>pPX*hH8d"


def _usable(record: dict[str, Any]) -> bool:
    metrics = record.get("metrics") or {}
    size, speed = metrics.get(SIZE), metrics.get(SPEED)
    return record.get("status") == "ok" and _finite(size) and _finite(speed)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_speed_and_quality(records: list[dict[str, Any]], path: Path) -> Path:
    """Write the two-panel picture for ``records`` (failed or mock jobs are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r["metrics"] for r in records if _usable(r)]
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
            speed_ax.plot(
                point[SIZE],
                point[SPEED],
                marker_of[str(point.get("quantization"))],
                color=line.get_color(),
                markersize=8,
            )
            speed_ax.annotate(
                str(point.get("quantization")),
                (point[SIZE], point[SPEED]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    speed_ax.set_xlabel("file size (MB)")
    speed_ax.set_ylabel("generation tokens/s (wall clock)")
    speed_ax.set_title("speed vs size")
    if series:
        speed_ax.legend(fontsize=8)
    else:
        speed_ax.text(
            0.5, 0.5, "no successful model jobs", ha="center", transform=speed_ax.transAxes
        )

    by_quant: dict[str, dict[str, Any]] = {}
    for point in points:
        if _finite(point.get(PERPLEXITY)):
            by_quant.setdefault(str(point.get("quantization")), point)
    for quant, point in sorted(by_quant.items(), key=lambda item: item[1][SIZE]):
        quality_ax.plot(point[SIZE], point[PERPLEXITY], marker_of[quant], markersize=8, color="C3")
        quality_ax.annotate(
            quant,
            (point[SIZE], point[PERPLEXITY]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    quality_ax.set_xlabel("file size (MB)")
    quality_ax.set_ylabel("perplexity on the reference text")
    quality_ax.set_title("quality vs size (lower is better)")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return path


class GenerationSweepSummary(SweepSummary):
    """``SweepSummary`` for generation sweeps: same table files, plus ``summary.png``."""

    def extra_outputs(self, sweep_dir: Path, records: list[dict[str, Any]]) -> None:
        try:
            plot_speed_and_quality(records, sweep_dir / "summary.png")
        except Exception as exc:  # a missing plotting library must not lose the tables
            log.warning("summary.png not written: %s", exc)
