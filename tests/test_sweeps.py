"""Sweeps as users run them: `python train.py -m ...` with a summary, and failures as rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import CLI_TEST_OVERRIDES, run_entrypoint

FAST = (*CLI_TEST_OVERRIDES, "logger=none", "model=mlp_mnist", "trainer.max_epochs=1")


def summary_from(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("summary: "), stdout[-2000:]
    return Path(last.removeprefix("summary: "))


@pytest.mark.slow
def test_grid_sweep_summary_with_one_failing_job(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py",
        "-m",
        *FAST,
        f"paths.log_dir={tmp_path}",
        "model.optimizer.lr=0.003,-1",
        "datamodule.batch_size=64,128",
        "trainer.limit_train_batches=10",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary_md = summary_from(result.stdout)
    sweep_dir = summary_md.parent
    assert sweep_dir.parent == tmp_path / "train" / "multiruns"
    with (sweep_dir / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    ok_scores = [float(r["val/acc_best"]) for r in rows[:2]]
    assert ok_scores == sorted(ok_scores, reverse=True) and min(ok_scores) > 0.3
    for row in rows[:2]:
        assert "model.optimizer.lr=0.003" in row["overrides"] and float(row["test/acc"]) > 0.3
        assert int(row["epochs_run"]) == 1 and float(row["wall_s"]) > 0
    for row in rows[2:]:
        assert "model.optimizer.lr=-1" in row["overrides"]
        assert "model.optimizer.lr=-1" in row["error"] and "a number > 0" in row["error"]
    assert "| failed |" in summary_md.read_text()
    jobs = json.loads((sweep_dir / "summary.json").read_text())["jobs"]
    assert len(jobs) == 4
    for job in ("0", "1", "2", "3"):  # every job dir keeps its config, as composed and resolved
        assert (sweep_dir / job / ".hydra" / "config.yaml").is_file()
        resolved = (sweep_dir / job / "config_resolved.yaml").read_text()
        assert "${" not in resolved and f"output_dir: {sweep_dir / job}" in resolved


@pytest.mark.slow
def test_optuna_sweep_two_trials(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py",
        "-m",
        "hparams_search=mnist_optuna",
        *CLI_TEST_OVERRIDES,
        "logger=none",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "trainer.limit_train_batches=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = summary_from(result.stdout).parent
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_value" in best and "model.optimizer.lr" in best
    with (sweep_dir / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    best_value = float(best.split("best_value:")[1].split()[0])
    assert best_value == pytest.approx(max(float(r["val/acc_best"]) for r in rows))
