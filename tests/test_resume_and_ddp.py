"""Resuming a run killed with SIGKILL, and DDP with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ml_engine.cli import PROJECT_ROOT
from tests.conftest import CLI_TEST_OVERRIDES, run_dir_of, run_entrypoint

SMALL = (*CLI_TEST_OVERRIDES, "logger=none", "model=mlp_mnist")


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    overrides = [
        *SMALL,
        "trainer.max_epochs=5",
        "trainer.limit_train_batches=40",
        "datamodule.batch_size=32",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "train.py"), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        _wait_for(last, process)
        time.sleep(0.3)  # into the next epoch
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert 1 <= saved["epoch"] + 1 < 5, "the kill should land mid-training"
    assert not (run_dir / "metrics.json").exists()

    result = run_entrypoint(
        "train.py",
        *SMALL,
        "trainer.max_epochs=5",
        "trainer.limit_train_batches=40",
        "datamodule.batch_size=32",
        f"ckpt_path={last}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr
    resumed_dir = run_dir_of(result)
    metrics = json.loads((resumed_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 5 and metrics["test/acc"] > 0.5
    final = torch.load(
        resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert final["global_step"] == 5 * 40


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py",
        *SMALL,
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=10",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output
    run_dir = run_dir_of(result)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test/acc"] > 0.3
    # each rank stepped through its half of the batches: 10 steps per epoch in total per rank
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * 10
