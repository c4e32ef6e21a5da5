"""Sweeps as users run them: `python train.py -m ...` with a summary, and failures as rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ml_engine.errors import UserError
from ml_engine.run import launch
from ml_engine.run.files import read_job_record
from ml_engine.run.optuna_study import open_storage
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
def test_an_optuna_sweep_prunes_bad_trials_and_takes_the_best_from_completed_ones(
    tmp_path: Path,
) -> None:
    import optuna
    import yaml

    result = run_entrypoint(
        "train.py",
        "-m",
        "hparams_search=mnist_optuna",
        *CLI_TEST_OVERRIDES,
        "logger=none",
        "trainer.max_epochs=3",
        f"paths.log_dir={tmp_path}",
        "trainer.limit_train_batches=6",
        "test=false",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.pruner=median",
        # a learning rate too small to learn in 3 epochs: trials with it fall behind the median
        "hydra.sweeper.params={model.optimizer.lr: 'choice(0.003, 0.00001)'}",
        "hydra.sweeper.sampler.n_startup_trials=5",
        "hydra.sweeper.sampler.seed=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = summary_from(result.stdout).parent
    journal = open_storage(str(sweep_dir / "optuna.journal"))
    study = optuna.load_study(study_name="mnist", storage=journal)
    states = [t.state.name for t in study.trials]
    assert len(states) == 5 and "PRUNED" in states and "COMPLETE" in states, states
    jobs = {
        job["trial"]: job for job in json.loads((sweep_dir / "summary.json").read_text())["jobs"]
    }
    for trial in study.trials:
        job = jobs[trial.number]
        epochs = job["metrics"]["epochs_run"]
        if trial.state.name == "PRUNED":  # stopped early, recorded as pruned everywhere
            assert job["status"] == "pruned" and epochs == job["metrics"]["pruned_at_epoch"] < 3
            assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
        else:
            assert job["status"] == "ok" and epochs == 3 and "pruned_at_epoch" not in job["metrics"]
    with (sweep_dir / "summary.csv").open() as handle:
        assert sorted(r["status"] for r in csv.DictReader(handle)) == sorted(
            "ok" if s == "COMPLETE" else "pruned" for s in states
        )
    # the study's best, from completed trials only
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    complete = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    assert best["best_value"] == pytest.approx(max(complete)) and "model.optimizer.lr" in str(best)
    assert "pruned" in (sweep_dir / "study.md").read_text()


@pytest.mark.slow
def test_an_optimized_metric_no_job_reports_stops_the_sweep(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py",
        "-m",
        *FAST,
        f"paths.log_dir={tmp_path}",
        "optimized_metric=val/nope",
        "model.optimizer.lr=-1,0.003,0.002",  # the first job fails: no metrics, no stop
        "trainer.limit_train_batches=10",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: optimized_metric='val/nope' is not among this job's metrics; available: "
    ), result.stderr[-3000:]
    available = last.split("available: ")[1].split(", ")
    assert {"test/acc", "val/acc", "val/acc_best", "epochs_run"} <= set(available)
    assert available == sorted(available) and "best_ckpt" not in available
    records = [
        read_job_record(p.parent) for p in sorted(tmp_path.glob("train/multiruns/*/*/job.json"))
    ]
    assert [r["status"] for r in records] == ["failed", "ok"]  # the third job never started
    assert "summary: " not in result.stdout


@pytest.fixture
def in_a_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_is_multirun", lambda: True)


METRICS = {"val/acc": 0.9, "val/loss": None, "epochs_run": 1, "best_ckpt": "/x/best.ckpt"}


def test_the_optimized_value_is_the_jobs_metric(in_a_sweep) -> None:
    cfg = OmegaConf.create({"optimized_metric": "val/acc"})
    assert launch.optimized_value(cfg, METRICS) == 0.9
    assert launch.optimized_value(OmegaConf.create({}), METRICS) is None


def test_a_metric_measured_as_nan_stays_nan(in_a_sweep) -> None:
    # collect_metrics keeps a diverged loss as None: the job measured it, the sweep goes on
    cfg = OmegaConf.create({"optimized_metric": "val/loss"})
    assert math.isnan(launch.optimized_value(cfg, METRICS))


def test_a_metric_the_job_lacks_names_the_ones_it_has(in_a_sweep) -> None:
    cfg = OmegaConf.create({"optimized_metric": "val/accc"})
    with pytest.raises(UserError) as caught:
        launch.optimized_value(cfg, METRICS)
    assert str(caught.value) == (
        "optimized_metric='val/accc' is not among this job's metrics; "
        "available: epochs_run, val/acc"
    )
    cfg = OmegaConf.create({"optimized_metric": "best_ckpt"})
    with pytest.raises(UserError) as caught:
        launch.optimized_value(cfg, METRICS)
    assert str(caught.value) == (
        "optimized_metric='best_ckpt' is '/x/best.ckpt', not a number; "
        "numeric metrics of this job: epochs_run, val/acc"
    )


def test_outside_a_sweep_a_missing_metric_is_only_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_is_multirun", lambda: False)
    cfg = OmegaConf.create({"optimized_metric": "val/accc"})
    assert math.isnan(launch.optimized_value(cfg, METRICS))
