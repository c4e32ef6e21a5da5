"""A sweep killed with SIGKILL resumes when the same command runs again: grid sweeps (basic
and submitit_local launchers) and Optuna studies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ml_engine.run.files import read_job_record
from ml_engine.run.grid_sweeper import contiguous_runs, job_identity
from tests.conftest import CLI_TEST_OVERRIDES, PROJECT_ROOT, run_entrypoint

QUICK = (
    *CLI_TEST_OVERRIDES,
    "logger=none",
    "model=mlp_mnist",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=2",
    "test=false",
)
GRID = ("model.optimizer.lr=0.001,0.002,0.003", "datamodule.batch_size=32,64")  # 6 jobs


def records(sweep_dir: Path) -> dict[str, dict]:
    return {
        path.parent.name: read_job_record(path.parent) or {}
        for path in sorted(sweep_dir.glob("*/job.json"))
    }


def start_sweep(*overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "train.py"), "-m", *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its launcher's job processes die with it
    )


def kill_when(sweep: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL the sweep's whole process group once ``ready()``."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert sweep.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the sweep never reached the kill point"
            time.sleep(0.05)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=60)


def mid_sweep(sweep_dir: Path, ok: int) -> Callable[[], bool]:
    """At least ``ok`` jobs finished and one more is running."""

    def ready() -> bool:
        statuses = [r.get("status") for r in records(sweep_dir).values()]
        return statuses.count("ok") >= ok and "running" in statuses

    return ready


def run_counts(sweep_dir: Path) -> dict[str, int]:
    """How often each job dir's job started (its log file gets one seed line per run)."""
    return {
        path.parent.name: path.read_text().count("Seed set to")
        for path in sorted(sweep_dir.glob("*/train.log"))
    }


def test_contiguous_runs_keep_job_numbers() -> None:
    assert contiguous_runs([0, 1, 3, 4, 5, 9]) == [[0, 1], [3, 4, 5], [9]]
    assert contiguous_runs([]) == []


def test_a_job_is_named_by_its_overrides_not_the_sweeps_settings() -> None:
    plain = job_identity(["a=1", "b=2"])
    assert job_identity(["a=1", "b=2", "+sweep.retry_failed=true"]) == plain
    assert job_identity(["a=1", "b=3"]) != plain


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_a_killed_grid_sweep_resumes_without_running_a_job_twice(launcher, tmp_path) -> None:
    if launcher == "submitit_local":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    command = (*QUICK, *GRID, f"hydra.sweep.dir={sweep_dir}", f"hydra/launcher={launcher}")
    if launcher == "submitit_local":  # two jobs at a time, in their own processes
        command += ("hydra.sweeper.max_batch_size=2",)
    kill_when(start_sweep(*command), mid_sweep(sweep_dir, ok=2))
    before = records(sweep_dir)
    finished = {job for job, record in before.items() if record["status"] == "ok"}
    assert 2 <= len(finished) < 6
    assert any(r["status"] == "running" for r in before.values())
    frozen = {job: (sweep_dir / job / "job.json").read_bytes() for job in finished}

    result = run_entrypoint("train.py", "-m", *command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())["jobs"]
    assert len(summary) == 6 and all(job["status"] == "ok" for job in summary)
    assert sorted(job["job"] for job in summary) == [str(n) for n in range(6)]
    assert len({tuple(job["overrides"]) for job in summary}) == 6
    for job in finished:  # recorded ok: not run again
        assert (sweep_dir / job / "job.json").read_bytes() == frozen[job]
        assert run_counts(sweep_dir)[job] == 1


@pytest.mark.slow
def test_failed_grid_jobs_run_again_only_when_asked(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    command = (*QUICK, "model.optimizer.lr=0.002,-1", f"hydra.sweep.dir={sweep_dir}")

    def written() -> dict[str, int]:  # when each job last wrote its record
        return {job: (sweep_dir / job / "job.json").stat().st_mtime_ns for job in ("0", "1")}

    first = run_entrypoint("train.py", "-m", *command)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["status"] for r in records(sweep_dir).values()] == ["ok", "failed"]
    after_first = written()
    again = run_entrypoint("train.py", "-m", *command)
    assert again.returncode == 0 and written() == after_first  # nothing ran
    retried = run_entrypoint("train.py", "-m", *command, "+sweep.retry_failed=true")
    assert retried.returncode == 0, retried.stderr[-3000:]
    after_retry = written()
    assert after_retry["0"] == after_first["0"] and after_retry["1"] > after_first["1"]
    assert run_counts(sweep_dir)["0"] == 1  # the ok job trained once
    summary = json.loads((sweep_dir / "summary.json").read_text())["jobs"]
    assert len(summary) == 2


@pytest.mark.slow
def test_a_killed_optuna_sweep_resumes_and_replaces_the_killed_trial(tmp_path: Path) -> None:
    import optuna

    sweep_dir = tmp_path / "sweep"
    command = (
        "hparams_search=mnist_optuna",
        *(o for o in QUICK if o != "model=mlp_mnist"),  # the search's params are the cnn's
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.n_startup_trials=4",
        f"hydra.sweep.dir={sweep_dir}",
    )
    kill_when(start_sweep(*command), mid_sweep(sweep_dir, ok=2))
    killed = next(r for r in records(sweep_dir).values() if r["status"] == "running")

    result = run_entrypoint("train.py", "-m", *command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(
        study_name="mnist",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal"))
        ),
    )
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4, states  # n_trials counts finished trials
    dead = study.trials[killed["trial"]]
    assert dead.state.name == "FAIL" and dead.user_attrs["failure"] == "killed"
    rerun = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(rerun) == 1 and rerun[0].params == dead.params  # the killed params ran again
    summary = json.loads((sweep_dir / "summary.json").read_text())["jobs"]
    assert len(summary) == 5 and len({job["job"] for job in summary}) == 5
    failed = [job for job in summary if job["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith("killed")
    # the killed trial's params ran again as a new trial, in a new dir: no dir ran twice (the
    # killed job may have died before its first log line)
    counts = run_counts(sweep_dir)
    killed_dir = failed[0]["job"]
    assert counts.get(killed_dir, 0) <= 1
    assert all(count == 1 for job, count in counts.items() if job != killed_dir), counts
