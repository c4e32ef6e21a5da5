"""Overhead of a generation sweep: wall time of a 6-job sweep on the tiny model against the
model work its jobs measured, and one single run against its own work, in the same run.

    python bench/llm_sweep_overhead.py

``work_s`` is what a job's worker spends on the model (resolve the file, load, warm up,
repetitions, quality). Everything else — Python and Hydra start-up, one child process per job,
result files, the summary — is overhead. Outputs go to a temporary dir; models to models/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ml_engine.run.locations import PROJECT_ROOT

COMMON = ("logger=none", "extras.print_config=false", "llm.n_threads=1", "bench.repetitions=3")
SWEEP = ("llm.quantization=f32,q8_0,q4_k_m", "llm.n_gpu_layers=0,99")


def run(args: list[str], log_dir: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "generate.py"), *args, f"paths.log_dir={log_dir}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    )
    return time.perf_counter() - started, done.stdout.strip().splitlines()[-1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        run([*COMMON, "llm.quantization=f32"], log_dir)  # writes/quantizes models once, untimed
        run([*COMMON, "llm.quantization=q8_0"], log_dir)
        run([*COMMON, "llm.quantization=q4_k_m"], log_dir)

        single_wall, last = run([*COMMON, "llm.quantization=q4_k_m"], log_dir)
        single = json.loads((Path(last.removeprefix("run_dir: ")) / "job.json").read_text())
        single_work = single["metrics"]["work_s"]

        sweep_wall, last = run(["-m", *COMMON, *SWEEP], log_dir)
        jobs = json.loads(
            (Path(last.removeprefix("summary: ")).parent / "summary.json").read_text()
        )
        works = [job["metrics"]["work_s"] for job in jobs["jobs"]]

    print("| measurement | wall s | model work s | wall ÷ work |")
    print("|---|---|---|---|")
    print(
        f"| single run (q4_k_m) | {single_wall:.2f} | {single_work:.2f} | "
        f"{single_wall / single_work:.2f} |"
    )
    print(
        f"| 6-job sweep vs its jobs' work | {sweep_wall:.2f} | {sum(works):.2f} | "
        f"{sweep_wall / sum(works):.2f} |"
    )
    print(
        f"| 6-job sweep vs 6 × single work | {sweep_wall:.2f} | {6 * single_work:.2f} | "
        f"{sweep_wall / (6 * single_work):.2f} |"
    )
    per_job = (sweep_wall - single_wall) / 5 - sum(works) / 6
    print(
        f"per-job overhead inside a sweep ≈ {per_job:.2f} s "
        f"(process start-up paid once: {single_wall - single_work:.2f} s)"
    )


if __name__ == "__main__":
    main()
