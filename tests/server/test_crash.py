"""``kill -9`` of a real ``python serve.py`` while training jobs run: the trainings die with
it, and the restarted server records each job as it really ended."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from ml_engine.run.files import read_job_record
from ml_engine.training.progress import PROGRESS_FILE
from tests.server.conftest import JOB_OVERRIDES, ServePy, free_port, serve_py, wait_for_job

pytestmark = pytest.mark.slow

QUICK = [
    *[o for o in JOB_OVERRIDES if "limit_train_batches" not in o],
    "++trainer.limit_train_batches=10",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "callbacks.early_stopping=null",
]


def _serve_py(tmp_path: Path, port: int, poll_interval_s: float) -> AbstractContextManager[ServePy]:
    overrides = "[" + ",".join(f"'{o}'" for o in QUICK) + "]"
    return serve_py(
        tmp_path,
        f"runs_dir={tmp_path / 'runs'}",
        "jobs.max_running=2",
        f"jobs.poll_interval_s={poll_interval_s}",
        f"jobs.extra_overrides={overrides}",
        port=port,
    )


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _trainings_of(server_pid: int, run_dir: str) -> list[int]:
    """Live child processes of the server training into ``run_dir``."""
    return [pid for pid in _children(server_pid) if _runs_into(pid, run_dir)]


def _runs_into(pid: int, run_dir: str) -> bool:
    """Whether ``pid`` is alive and a training into ``run_dir`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return run_dir in cmdline and _alive(pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_kill_9_of_the_server_ends_its_trainings_and_a_restart_tells_the_truth(tmp_path) -> None:
    port = free_port()
    # the server looks at its jobs only every 10 minutes: the short job finishes unrecorded
    with _serve_py(tmp_path, port, poll_interval_s=600) as served:
        url, server = served.url, served.process
        trainings: list[int] = []
        try:
            body = {"model": "mlp_mnist", "device": "cpu", "data_source": "bundled"}
            short = httpx.post(f"{url}/ml/train", json={**body, "epochs": 1}).json()
            long = httpx.post(f"{url}/ml/train", json={**body, "epochs": 100}).json()
            _wait_for(
                lambda: (read_job_record(Path(short["run_dir"])) or {}).get("status") == "ok",
                300,
                "the short job did not finish",
            )
            _wait_for(lambda: Path(long["run_dir"], PROGRESS_FILE).is_file(), 300, "no progress")
            _wait_for(
                lambda: not _trainings_of(server.pid, short["run_dir"]),
                60,
                "short job still exits",
            )
            trainings = _trainings_of(server.pid, long["run_dir"])
            assert len(trainings) == 1, trainings  # the long job, mid-way
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            _wait_for(
                lambda: not _alive(trainings[0]), 10, "the training outlived the killed server"
            )
        finally:
            for pid in trainings:  # an orphan of a failed run of this test must not train on
                if _runs_into(pid, long["run_dir"]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    assert read_job_record(Path(long["run_dir"])) is None  # it never finished

    with (
        _serve_py(tmp_path, port, poll_interval_s=0.2),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        done = wait_for_job(client, short["id"], ("succeeded", "failed"), timeout=30)
        assert done["status"] == "succeeded", done
        assert done["metrics"]["epochs_run"] == 1 and "test/acc" in done["metrics"]
        killed = wait_for_job(client, long["id"], ("succeeded", "failed"), timeout=30)
        assert killed["status"] == "failed" and "died" in killed["error"], killed
        best = {m["name"]: m["best"] for m in client.get("/ml/models").json()["models"]}
        assert best["mlp_mnist"]["run"] == done["run"]
    print(json.dumps({"short": done["status"], "long": killed["error"]}))
