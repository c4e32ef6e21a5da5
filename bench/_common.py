"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def ratio_line(label: str, ours: list[float], baseline: list[float], unit: str) -> str:
    """Median rates and the median of per-round ratios (ours ÷ baseline of the same round).

    Rounds alternate baseline and ours back to back, so a round's ratio sees the same machine
    load on both sides; the median of those ratios is the figure the README quotes.
    """
    ours_median, base_median = statistics.median(ours), statistics.median(baseline)
    ratios = [o / b for o, b in zip(ours, baseline, strict=True)]
    return (
        f"{label}: ours {ours_median:,.1f} {unit}, baseline {base_median:,.1f} {unit}, "
        f"ratio {statistics.median(ratios):.3f} "
        f"(per round: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
