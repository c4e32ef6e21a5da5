"""optuna-dashboard (the ``dashboard`` extra) opens a study where our sweeper keeps it: a
journal file given as a plain path, or an RDB URL; its HTTP API shows what was stored."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import optuna
import pytest

from ml_engine.run.optuna_study import open_storage

DASHBOARD = Path(sys.executable).parent / "optuna-dashboard"

pytestmark = pytest.mark.skipif(
    not DASHBOARD.is_file() and shutil.which("optuna-dashboard") is None,
    reason='needs optuna-dashboard: pip install "ml-engine[dashboard]"',
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _build_study(storage: str) -> None:
    """Three complete trials, one pruned after two reports, one failed: what a sweep leaves."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="mnist", storage=open_storage(storage), direction="maximize"
    )
    for value in (0.91, 0.95, 0.88):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        study.tell(trial, value)
    pruned = study.ask()
    pruned.suggest_float("lr", 1e-4, 1e-1, log=True)
    pruned.report(0.4, step=1)
    pruned.report(0.5, step=2)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)


def _wait_until_served(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"optuna-dashboard exited: {process.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/meta", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "optuna-dashboard did not answer"
        time.sleep(0.1)


@pytest.fixture
def dashboard() -> Iterator:
    """``dashboard(storage)`` → the base URL of ``optuna-dashboard <storage>`` on a free port;
    every process started is killed at the end, whatever the test did."""
    processes: list[subprocess.Popen] = []

    def start(storage: str) -> str:
        port = free_port()
        command = [str(DASHBOARD), storage, "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        _wait_until_served(url, process)
        return url

    yield start
    for process in processes:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_optuna_dashboard_shows_a_study_as_our_sweeper_stores_it(
    dashboard, tmp_path: Path, kind: str
) -> None:
    # the sweeper's default: <sweep dir>/optuna.journal, given to the dashboard as a plain path
    storage = (
        str(tmp_path / "optuna.journal") if kind == "journal" else f"sqlite:///{tmp_path}/o.db"
    )
    _build_study(storage)
    url = dashboard(storage)

    studies = httpx.get(f"{url}/api/studies", timeout=10).json()["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in studies] == [("mnist", ["maximize"])]
    detail = httpx.get(f"{url}/api/studies/{studies[0]['study_id']}?after=0", timeout=10).json()
    trials = detail["trials"]
    assert [t["state"] for t in trials] == ["Complete"] * 3 + ["Pruned", "Fail"]
    assert [t.get("values") for t in trials[:3]] == [[0.91], [0.95], [0.88]]
    assert [(v["step"], v["value"]) for v in trials[3]["intermediate_values"]] == [
        (1, 0.4),
        (2, 0.5),
    ]
    assert [t["number"] for t in detail["best_trials"]] == [1]
    assert detail["best_trials"][0]["values"] == [0.95]
    assert detail["has_intermediate_values"] is True


def test_optuna_dashboard_wants_a_sqlite_file_as_a_url(tmp_path: Path) -> None:
    database = tmp_path / "o.db"
    _build_study(f"sqlite:///{database}")
    result = subprocess.run(
        [str(DASHBOARD), str(database), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"Please specify 'sqlite:///{database}'" in result.stderr
