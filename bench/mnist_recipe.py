"""Two training recipes compared on the bundled digits, on several seeded stratified splits.

The official 10k MNIST test set needs the real data; without it, each recipe is trained with
``train.py`` on the 5,000 bundled digits split by ``datamodule.split_seed`` (a quarter held out
for testing: 1,250 digits per split), the same splits for both recipes, and the test accuracies
are reported per split with their mean, spread and the paired difference.

    python bench/mnist_recipe.py [--seeds 1 2 3 4] [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the recipe of main before issue 12, spelled out so that it stays measurable after the
# defaults change, and the current defaults
RECIPES = {
    "old": ["model.net.widths=[16,32,64]", "model.label_smoothing=0.05"],
    "new": [],
}
COMMON = [
    "datamodule.source=bundled",
    "datamodule.test_fraction=0.25",
    "logger=none",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
    "extras.print_config=false",
]


def test_accuracy(overrides: list[str], output: Path) -> tuple[float, float]:
    """test/acc and wall seconds of one ``train.py`` run."""
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={output}"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    record = json.loads((output / "job.json").read_text())
    return record["metrics"]["test/acc"], record["metrics"]["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in RECIPES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # interleaved: both recipes see the same machine load
            for name, recipe in RECIPES.items():
                overrides = [
                    *COMMON,
                    *recipe,
                    f"datamodule.split_seed={seed}",
                    f"seed={seed}",
                    f"trainer.max_epochs={args.epochs}",
                ]
                acc, wall = test_accuracy(overrides, Path(tmp) / f"{name}-{seed}")
                results[name].append(acc)
                print(f"split_seed={seed} {name}: test/acc {acc:.4f} ({wall:.0f} s)", flush=True)
    for name, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name}: mean {statistics.mean(accs):.4f} ± {spread:.4f} over {len(accs)} splits")
    gains = [n - o for n, o in zip(results["new"], results["old"], strict=True)]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    print(f"new - old: mean {statistics.mean(gains):+.4f} ± {spread:.4f} (paired by split)")


if __name__ == "__main__":
    main()
