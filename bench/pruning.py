"""Pruning's saving on an Optuna search: the same seeded study (sampler, trials, data) with
``hydra.sweeper.pruner=none`` and ``=median``, both run here, one after the other.

Prints, for each: epochs trained over all trials, trials pruned, wall time and the best
``val/acc_best``; then the ratios (median / none). Epoch counts and the best value do not depend
on the machine's load; the wall time does, hence the ratio of two runs measured together.

    python bench/pruning.py [--trials 12] [--epochs 5] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_study(pruner: str, args: argparse.Namespace, out: Path) -> dict:
    sweep_dir = out / pruner
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=mnist_optuna",
        "datamodule.source=bundled", "trainer.accelerator=cpu", "logger=none", "test=false",
        "extras.print_config=false", "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false", f"trainer.max_epochs={args.epochs}",
        f"trainer.limit_train_batches={args.batches}", "callbacks.early_stopping=null",
        f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.sampler.seed={args.seed}",
        f"hydra.sweeper.pruner={pruner}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - started
    jobs = json.loads((sweep_dir / "summary.json").read_text())["jobs"]
    complete = [j["metrics"]["val/acc_best"] for j in jobs if j["status"] == "ok"]
    return {
        "pruner": pruner,
        "epochs": sum(j["metrics"]["epochs_run"] for j in jobs),
        "pruned": sum(j["status"] == "pruned" for j in jobs),
        "wall_s": wall,
        "best": max(complete),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20, help="training batches per epoch")
    parser.add_argument("--seed", type=int, default=1234, help="the TPE sampler's seed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_study(pruner, args, Path(tmp)) for pruner in ("none", "median")]
    setup = f"{args.trials} trials × up to {args.epochs} epochs of {args.batches} batches"
    print(f"{setup}, TPE seed {args.seed}")
    print("| pruner | epochs trained | trials pruned | wall s | best val/acc_best |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pruner']} | {row['epochs']} | {row['pruned']} | {row['wall_s']:.1f} "
            f"| {row['best']:.4f} |"
        )
    none, median = rows
    print(
        f"ratio median/none: epochs {median['epochs'] / none['epochs']:.3f}, "
        f"wall {median['wall_s'] / none['wall_s']:.3f}, best {median['best'] / none['best']:.4f}"
    )


if __name__ == "__main__":
    main()
