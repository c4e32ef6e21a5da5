"""Scale-out paths in their local form: two DDP "nodes" through torchrun, a sweep through
submitit's local executor, two Optuna sweeps sharing one study."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml_engine.errors import UserError
from ml_engine.run.distributed import (
    external_launcher,
    global_rank,
    shared_run_dir_override,
    shared_run_name,
)
from ml_engine.run.files import read_job_record
from ml_engine.run.locations import PROJECT_ROOT
from ml_engine.training.accelerators import check_num_nodes
from tests.conftest import CLI_TEST_OVERRIDES, run_entrypoint

TORCHRUN = Path(sys.executable).with_name("torchrun")
QUICK = (*CLI_TEST_OVERRIDES, "logger=none")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


# ---- who is rank zero, and where every process writes


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"LOCAL_RANK": "1"}, 1),  # Lightning's own child process on the first node
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 1_000_000),
        ({"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, 1),  # torchrun, second node
        ({"RANK": "0", "LOCAL_RANK": "0"}, 0),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}, 2),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, 0),  # an sbatch script's own process
    ],
)
def test_the_global_rank_comes_from_whoever_launched(env: dict, rank: int) -> None:
    assert global_rank(env) == rank


def test_torchrun_and_srun_processes_share_one_run_dir() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "exp7", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2"}
    assert external_launcher(torchrun) == "torchrun"
    assert shared_run_name(torchrun) == "torchrun-exp7"
    override = shared_run_dir_override(["trainer=ddp_cpu"], torchrun)
    assert override == "hydra.run.dir=${paths.log_dir}/${task_name}/runs/torchrun-exp7"
    # the user's own choice, and sweeps, are left alone
    assert shared_run_dir_override(["hydra.run.dir=/shared/x"], torchrun) is None
    assert shared_run_dir_override(["-m", "seed=1,2"], torchrun) is None
    # one node without --rdzv-id: the agent that started every process names the dir
    one_node = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}
    assert shared_run_name(one_node, parent_pid=4242) == "torchrun-4242"
    several = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2"}
    with pytest.raises(UserError, match="--rdzv-id"):
        shared_run_name(several)
    srun = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_JOB_ID": "991", "SLURM_STEP_ID": "0"}
    assert external_launcher(srun) == "srun" and shared_run_name(srun) == "slurm-991.0"
    assert external_launcher({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) is None  # Lightning's own
    assert shared_run_dir_override(["seed=1"], {}) is None  # a plain run keeps its own dir


def test_num_nodes_without_a_launcher_is_refused() -> None:
    check_num_nodes({"num_nodes": 1}, env={})
    check_num_nodes({"num_nodes": 2}, env={"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"})
    check_num_nodes({"num_nodes": 2}, env={"SLURM_JOB_ID": "5"})
    with pytest.raises(UserError, match=r"trainer.num_nodes=2 needs a launcher.*torchrun"):
        check_num_nodes({"num_nodes": 2}, env={})


@pytest.mark.slow
def test_num_nodes_from_a_plain_command_is_one_line(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py", *QUICK, "trainer=ddp_cpu", "trainer.num_nodes=2", f"paths.log_dir={tmp_path}"
    )
    assert "trainer.num_nodes=2 needs a launcher" in _one_error_line(result)
    assert not (tmp_path / "train").exists()  # nothing left behind


# ---- two nodes on this machine


@pytest.mark.slow
def test_two_torchrun_nodes_train_one_run(tmp_path: Path) -> None:
    port = _free_port()
    command = [
        str(TORCHRUN), "--nnodes=2", "--nproc-per-node=1", "--master-addr=127.0.0.1",
        f"--master-port={port}", "--rdzv-id=two-nodes",
    ]  # fmt: skip
    overrides = [
        str(PROJECT_ROOT / "train.py"), *QUICK, "trainer=ddp_cpu", "trainer.devices=1",
        "trainer.num_nodes=2", "trainer.max_epochs=2", "trainer.limit_train_batches=10",
        f"paths.log_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    nodes = [
        subprocess.Popen(
            [*command, f"--node-rank={rank}", *overrides],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=420)[0])
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1]
    # one run dir for both nodes, named by torchrun's --rdzv-id; its records written once
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    assert run_dir.name == "torchrun-two-nodes"
    assert outputs[0].strip().splitlines()[-1] == f"run_dir: {run_dir}"
    assert "run_dir:" not in outputs[1]  # rank zero alone reports and records
    record = read_job_record(run_dir)
    assert record["status"] == "ok" and record["metrics"]["epochs_run"] == 2
    # 20 steps of the conv net on 250 test digits: above chance (0.10, σ≈0.02)
    assert record["metrics"]["test/acc"] > 0.15
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * 10  # each node stepped through its half of every epoch
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


# ---- a sweep through submitit's local executor


@pytest.mark.slow
def test_a_submitit_local_sweep_summarizes_like_the_basic_launcher(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run_entrypoint(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        *QUICK,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "test=false",
        "model.optimizer.lr=0.003,-1",
        f"paths.log_dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: ")
    summary = json.loads(Path(last.removeprefix("summary: ")).with_suffix(".json").read_text())
    statuses = {tuple(job["overrides"])[-2]: job["status"] for job in summary["jobs"]}
    assert statuses == {"model.optimizer.lr=0.003": "ok", "model.optimizer.lr=-1": "failed"}
    failed = next(job for job in summary["jobs"] if job["status"] == "failed")
    assert "model.optimizer.lr=-1" in failed["error"]
    # the jobs ran as submitit jobs (its own folder of logs and results)
    assert list(Path(last.removeprefix("summary: ")).parent.glob(".submitit/*/*_result.pkl"))


# ---- one Optuna study, two sweeps


def _optuna_sweep(tmp_path: Path, name: str, storage: str, trials: int) -> subprocess.Popen:
    overrides = [
        str(PROJECT_ROOT / "train.py"), "-m", "hparams_search=mnist_optuna",
        f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=shared", *QUICK, "trainer.max_epochs=1",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "test=false",
        f"paths.log_dir={tmp_path / name}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_optuna_sweeps_share_one_study(kind: str, tmp_path: Path) -> None:
    """Two workers on one study: n_trials is the study's size, split between them, no trial
    run twice; a journal file (Optuna's JournalStorage) shares it like SQLite does."""
    import optuna

    from ml_engine.run.optuna_study import open_storage

    storage = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"{tmp_path}/study.log"
    sweeps = [_optuna_sweep(tmp_path, name, storage, trials=6) for name in ("a", "b")]
    done = [sweep.communicate(timeout=600) for sweep in sweeps]
    for sweep, (_, stderr) in zip(sweeps, done, strict=True):
        assert sweep.returncode == 0, stderr[-3000:]
    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    assert [t.number for t in study.trials] == list(range(6))  # none lost, none twice
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # reseeded samplers: the two workers did not propose the same trials
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params)
    own_jobs = []
    for stdout, _ in done:
        lines = stdout.strip().splitlines()
        assert lines[-1].startswith("summary: ") and lines[-2].startswith("study: ")
        sweep_dir = Path(lines[-1].removeprefix("summary: ")).parent
        own = json.loads((sweep_dir / "summary.json").read_text())["jobs"]
        assert own and all(job["status"] == "ok" for job in own)
        own_jobs += [job["trial"] for job in own]
    assert sorted(own_jobs) == list(range(6))  # each trial ran in exactly one worker
    # the last to finish lists the whole study, with every trial complete
    last = max(
        (Path(out.strip().splitlines()[-2].removeprefix("study: ")) for out, _ in done),
        key=lambda path: path.stat().st_mtime,
    )
    table = last.read_text()
    assert "6 trials" in table and table.count("| COMPLETE |") >= 5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("sqlite:////nonexistent-dir/study.db", "the folder /nonexistent-dir does not exist"),
        ("postgresql://user:pw@127.0.0.1:9/db", "cannot open the study storage"),
        ("/nonexistent-dir/study.journal", "the folder /nonexistent-dir does not exist"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_one_line(storage, expected, tmp_path) -> None:
    result = run_entrypoint(
        "train.py", "-m", "hparams_search=mnist_optuna", f"hydra.sweeper.storage={storage}",
        *QUICK, f"paths.log_dir={tmp_path}",
    )  # fmt: skip
    line = _one_error_line(result)
    assert f"hydra.sweeper.storage={storage}" in line and expected in line
    assert "sqlite:///" in line  # what is accepted
