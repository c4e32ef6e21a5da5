"""Resuming a run killed with SIGKILL, and DDP with two CPU processes (gloo)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ml_engine.run.files import read_job_record
from ml_engine.run.locations import PROJECT_ROOT
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
    assert read_job_record(run_dir) is None  # killed before the job could record anything

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
    metrics = read_job_record(resumed_dir)["metrics"]
    assert metrics["epochs_run"] == 5 and metrics["test/acc"] > 0.5
    final = torch.load(
        resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert final["global_step"] == 5 * 40


# the training page's DDP example: test_ddp_cpu_two_processes_with_the_default_model runs it as
# written (longer than test_readme_training_example_runs would, to check what DDP did)
DDP_EXAMPLE = "python train.py trainer=ddp_cpu"


@pytest.mark.slow
def test_ddp_cpu_two_processes_with_the_default_model(tmp_path: Path) -> None:
    # the default model (cnn_mnist) has BatchNorm: plain per-process BN, no SyncBatchNorm on CPU
    result = run_entrypoint(
        "train.py",
        *DDP_EXAMPLE.split()[2:],
        *CLI_TEST_OVERRIDES,
        "logger=none",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=10",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output
    run_dir = run_dir_of(result)
    record = read_job_record(run_dir)
    assert record["status"] == "ok"
    metrics = record["metrics"]
    # 20 steps of the conv net, mostly in the one-cycle warm-up: above chance (0.10, σ≈0.02 on
    # 250 digits), not yet good
    assert metrics["epochs_run"] == 2 and metrics["test/acc"] > 0.15
    # each rank stepped through its half of the batches: 10 steps per epoch in total per rank
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * 10


@pytest.mark.slow
def test_sync_batchnorm_on_cpu_is_refused_once(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py",
        *CLI_TEST_OVERRIDES,
        "logger=none",
        "trainer=ddp_cpu",
        "trainer.sync_batchnorm=true",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: trainer.sync_batchnorm=true needs CUDA GPUs, but trainer.accelerator='cpu' "
        "runs on CPU; set trainer.sync_batchnorm=false"
    ]
    assert "Traceback" not in result.stderr and "MEMBER" not in result.stdout + result.stderr


def _train_steps(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_entrypoint(
        "train.py",
        *SMALL,
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=1",
        "test=false",
        f"paths.log_dir={tmp_path}",
        *extra,
    )


@pytest.mark.slow
def test_resume_last_with_more_epochs_replans_the_schedule(tmp_path: Path) -> None:
    first = _train_steps(tmp_path, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    first_last = run_dir_of(first) / "checkpoints" / "last.ckpt"
    assert torch.load(first_last, weights_only=True)["global_step"] == 5

    resumed = _train_steps(tmp_path, "ckpt_path=last", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"resuming from {first_last}" in output
    assert "resuming at step 5: OneCycleLR re-planned for 10 total steps (was 5)" in output
    final = torch.load(
        run_dir_of(resumed) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert final["global_step"] == 10 and final["epoch"] == 1
    scheduler = final["lr_schedulers"][0]
    assert scheduler["total_steps"] == 10 and scheduler["last_epoch"] == 10


@pytest.mark.slow
def test_resume_last_without_runs_is_one_line(tmp_path: Path) -> None:
    result = _train_steps(tmp_path, "ckpt_path=last")
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip().splitlines()
    assert len(output) == 1, output
    assert output[0] == (
        f"error: ckpt_path=last: no last.ckpt under {tmp_path}/train/runs/*/checkpoints/ "
        "(train once first, or give ckpt_path=<path to a .ckpt>)"
    )


def _readme_cpu_training_commands() -> list[str]:
    """The training page's examples (docs/training.md, once the README's training section)
    that run on a CPU-only machine, as written."""
    page = (PROJECT_ROOT / "docs" / "training.md").read_text()
    section = page[page.index("## Commands") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    # hardware this machine may lack; resuming has its own tests
    needs_hardware = ("mps", "gpu", "trainer=ddp ", "ckpt_path=")
    return [
        c
        for c in commands
        if c.startswith("python train.py") and not any(h in c + " " for h in needs_hardware)
    ]


def test_readme_lists_the_cpu_training_examples() -> None:
    commands = _readme_cpu_training_commands()
    assert "python train.py" in commands and DDP_EXAMPLE in commands


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [c for c in _readme_cpu_training_commands() if c != DDP_EXAMPLE]
)
def test_readme_training_example_runs(tmp_path: Path, command: str) -> None:
    """Each example as written, shortened to a few batches of one epoch (the DDP one runs in
    test_ddp_cpu_two_processes_with_the_default_model)."""
    result = run_entrypoint(
        "train.py",
        *command.split()[2:],
        *CLI_TEST_OVERRIDES,
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=8",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_job_record(run_dir_of(result))["status"] == "ok"


@pytest.mark.slow
def test_a_schedule_too_short_to_plan_is_one_line(tmp_path: Path) -> None:
    result = _train_steps(tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=4")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: OneCycleLR cannot plan 4 steps (a phase shorter than one step); "
        "train for more steps or set model.scheduler=null"
    )
