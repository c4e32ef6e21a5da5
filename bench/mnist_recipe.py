"""Training recipes compared on the bundled digits by stratified k-fold, paired by fold.

The official 10k MNIST test set needs the real data; without it, each recipe is trained with
``train.py`` on the 5,000 bundled digits, once per fold of a stratified k-fold partition
(``datamodule.folds``/``datamodule.test_fold``, partition seeded by ``--split-seed``): fold k is
the test split (1,000 digits for 5 folds), 5 % of each class of the rest validates, the rest
(3,750; 4,250 for 10 folds, near a default run's 4,500) trains. Every recipe sees the same
folds and the same training seed per fold (seed = fold + 1, or ``--seed`` for all), so over the
folds every digit is tested once per recipe and the differences are paired by fold. Printed:
each run, then a table with each recipe's accuracy over all tested digits, its mean ± standard
error over folds and the paired difference to ``old``.

    python bench/mnist_recipe.py [--folds 5] [--recipes old new] [--epochs 15] [--seed S]
    python bench/mnist_recipe.py --folds 10 --recipes new --no-reference
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "old": the recipe of main before issue 12 (global average pooling after one last conv, the
# first epoch of the best val/acc tested, 15 epochs), spelled out so that it stays measurable;
# "new": the current defaults (the network's last conv stage and pooled head, the last epoch
# tested, 20 epochs). The others: candidates measured on top of "old" (README, "Accuracy and
# speed"); where a recipe sets a key twice, the later value wins (``merged``).
OLD = [
    "model.net.widths=[16,32,64]",
    "model.net.last_convs=1",
    "model.net.pooled_size=1",
    "model.net.dropout=0.1",
    "model.label_smoothing=0.05",
    "callbacks.model_checkpoint.monitor=val/acc",
    "callbacks.model_checkpoint.later_wins_ties=false",
    "trainer.max_epochs=15",
    "callbacks.early_stopping.patience=10",
]
RECIPES = {
    "old": OLD,
    "new": [],
    "wide": [*OLD, "model.net.widths=[24,48,96]"],
    # exponential moving average of the weights and BatchNorm statistics (Lightning's
    # WeightAveraging): validation, best.ckpt and the test use the averaged network
    "ema": [
        *OLD,
        "+callbacks.ema._target_=lightning.pytorch.callbacks.WeightAveraging",
        "+callbacks.ema.multi_avg_fn._target_=torch.optim.swa_utils.get_ema_multi_avg_fn",
        "+callbacks.ema.multi_avg_fn.decay=0.99",
    ],
    "e30": [*OLD, "trainer.max_epochs=30"],
    "elastic": [*OLD, "datamodule.augment.elastic_alpha=34"],
    "elastic30": [*OLD, "datamodule.augment.elastic_alpha=34", "trainer.max_epochs=30"],
    # the new network, tested on the epoch of the best val/acc (ties to the later) rather
    # than on the last epoch's
    "new_best_val": ["callbacks.model_checkpoint.monitor=val/acc"],
    # the new network with the 15 epochs (and early-stopping patience 10) it first had
    "new15": ["trainer.max_epochs=15", "callbacks.early_stopping.patience=10"],
}
COMMON = [
    "datamodule.source=bundled",
    "logger=none",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
    "extras.print_config=false",
]


def merged(overrides: list[str]) -> list[str]:
    """One override per key, the last one given (Hydra refuses a key set twice)."""
    by_key: dict[str, str] = {}
    for override in overrides:
        by_key.pop(override.split("=", 1)[0], None)
        by_key[override.split("=", 1)[0]] = override
    return list(by_key.values())


def run_recipe(overrides: list[str], output: Path) -> dict[str, float]:
    """test/acc, epochs run and wall seconds of one ``train.py`` run."""
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={output}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((output / "job.json").read_text())["metrics"]
    return {k: metrics[k] for k in ("test/acc", "epochs_run", "wall_s")}


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.mean(values), se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--recipes", nargs="+", default=["new"], choices=list(RECIPES))
    parser.add_argument("--split-seed", type=int, default=12345)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--test-folds", type=int, nargs="+", default=None, help="a subset of 0..folds-1"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="one training seed for all folds (default: fold + 1)"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="leave out old (no paired differences)"
    )
    args = parser.parse_args()
    reference_names = [] if args.no_reference else ["old"]  # old first: the reference
    names = list(dict.fromkeys([*reference_names, *args.recipes]))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        # interleaved: every recipe sees similar machine load
        for fold in args.test_folds or range(args.folds):
            for name in names:
                overrides = [
                    *COMMON,
                    *RECIPES[name],
                    f"datamodule.folds={args.folds}",
                    f"datamodule.test_fold={fold}",
                    f"datamodule.split_seed={args.split_seed}",
                    f"seed={fold + 1 if args.seed is None else args.seed}",
                ]
                if args.epochs is not None:
                    overrides.append(f"trainer.max_epochs={args.epochs}")
                run = run_recipe(merged(overrides), Path(tmp) / f"{name}-{fold}")
                results[name].append(run)
                print(
                    f"fold {fold} {name}: test/acc {run['test/acc']:.4f} "
                    f"({run['epochs_run']} epochs, {run['wall_s']:.0f} s)",
                    flush=True,
                )
    tested = len(results[names[0]])
    seeds = "fold + 1" if args.seed is None else str(args.seed)
    print(
        f"\n{tested} of {args.folds} folds of the 5,000 bundled digits "
        f"({tested * 5000 // args.folds:,} test digits per recipe), seed = {seeds}, paired by fold"
    )
    print("| recipe | acc per fold | mean ± SE | Δ vs old, mean ± SE | wall s (median) |")
    print("|---|---|---|---|---|")
    reference = [r["test/acc"] for r in results.get("old", [])]
    for name, runs in results.items():
        accs = [r["test/acc"] for r in runs]
        mean, se = mean_se(accs)
        if name == "old" or not reference:
            delta = "—"
        else:
            d_mean, d_se = mean_se([a - o for a, o in zip(accs, reference, strict=True)])
            delta = f"{100 * d_mean:+.2f} ± {100 * d_se:.2f} %"
        per_fold = " ".join(f"{100 * a:.2f}" for a in accs)
        wall = statistics.median(r["wall_s"] for r in runs)
        acc = f"{100 * mean:.2f} ± {100 * se:.2f} %"
        print(f"| {name} | {per_fold} | {acc} | {delta} | {wall:.0f} |")


if __name__ == "__main__":
    main()
