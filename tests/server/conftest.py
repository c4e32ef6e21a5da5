"""Fixtures for the server tests: configs under tmp_path, a real trained run, live servers."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from omegaconf import DictConfig, OmegaConf, open_dict

from ml_engine.run.files import read_job_record
from ml_engine.run.locations import PROJECT_ROOT
from ml_engine.server import create_app
from tests.conftest import compose_config, run_entrypoint, shrink

# every job the test servers start: bundled digits, short epochs, quiet logs
JOB_OVERRIDES = [
    "datamodule.source=bundled",
    "logger=none",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "++trainer.enable_progress_bar=false",
    "++trainer.limit_train_batches=25",
]


def held_job_overrides(step: int, release: Path) -> list[str]:
    """JOB_OVERRIDES plus a callback that holds every job after ``step`` until ``release``
    exists: what a test must see while a job runs stays there, however fast the machine."""
    hold = f"{{_target_:tests.server.gate.HoldAtStep,step:{step},release:'{release}'}}"
    return [*JOB_OVERRIDES, f"+callbacks.hold={hold}"]


def serve_config(tmp_path: Path, runs_dir: Path | None = None, **values: Any) -> DictConfig:
    """The composed ``serve`` config with outputs under ``tmp_path`` and ``values`` set."""
    cfg = shrink(compose_config("serve"), tmp_path)
    with open_dict(cfg):
        cfg.runs_dir = str(runs_dir or tmp_path / "runs")
        cfg.jobs_db = str(tmp_path / "serve" / "jobs.sqlite")
        cfg.jobs.extra_overrides = list(JOB_OVERRIDES)
        cfg.jobs.poll_interval_s = 0.2
        cfg.jobs.kill_grace_s = 3.0
        cfg.allowed_hosts = ["testserver"]  # the Host that Starlette's TestClient sends
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**config values)`` → a started TestClient on a fresh app."""
    clients: list[TestClient] = []

    def make(runs_dir: Path | None = None, **values: Any) -> TestClient:
        client = TestClient(create_app(serve_config(tmp_path, runs_dir, **values)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs dir holding one real cnn_mnist run (2 short epochs on the bundled digits)."""
    runs = tmp_path_factory.mktemp("trained") / "runs"
    run_dir = runs / "2025-01-01_00-00-00_fixture"
    result = run_entrypoint(
        "train.py",
        "model=cnn_mnist",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "seed=1",
        f"hydra.run.dir={run_dir}",
        *JOB_OVERRIDES,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_job_record(run_dir)["status"] == "ok"
    return runs


# a finished two-job training sweep and a generation sweep with its plot, as summary.json holds
# them: written by the real SweepSummary (the worse job first on disk, so sorting shows)
SWEEP_JOBS = {
    "train": [
        ("0", ["model.optimizer.lr=0.1"], {"val/acc_best": 0.61}),
        ("1", ["model.optimizer.lr=0.001"], {"val/acc_best": 0.93}),
        ("2", ["model.optimizer.lr=9"], None),  # failed: ranked last
    ],
    "generate": [
        ("0", ["llm.backend.threads=1"], {"tokens_per_s": 12.5}),
        ("1", ["llm.backend.threads=2"], {"tokens_per_s": 20.25}),
    ],
}


def write_sweeps(root: Path) -> dict[str, Path]:
    """``root/<kind>/multiruns/<sweep>/`` per kind with job records, summary files and (for the
    generation sweep) a summary.png; returns kind → multiruns dir (serve's ``sweeps_dirs``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from ml_engine.run.files import write_json_atomic
    from ml_engine.run.sweep_summary import SweepSummary

    dirs = {}
    for kind, jobs in SWEEP_JOBS.items():
        sweep_dir = root / kind / "multiruns" / f"2025-01-02_00-00-00_{kind}-sweep"
        for job, overrides, metrics in jobs:
            record = {"status": "ok", "overrides": overrides, "metrics": metrics}
            if metrics is None:
                record = {"status": "failed", "overrides": overrides, "error": "lr <b>9</b>"}
            (sweep_dir / job).mkdir(parents=True)
            write_json_atomic(sweep_dir / job / "job.json", record)
        metric = "val/acc_best" if kind == "train" else "tokens_per_s"
        SweepSummary(metric=metric, mode="max").write(sweep_dir)
        if kind == "generate":
            figure = plt.figure(figsize=(3, 2))
            figure.gca().bar(["1", "2"], [12.5, 20.25])
            figure.savefig(sweep_dir / "summary.png", dpi=50)
            plt.close(figure)
        dirs[kind] = sweep_dir.parent
    return dirs


def write_study(sweep_dir: Path, n_trials: int = 6) -> list[Path]:
    """An Optuna study of ``n_trials`` quick trials over 2 parameters in
    ``sweep_dir/optuna.journal``, as the sweeper keeps it, and its plots in ``sweep_dir/study/``."""
    import optuna

    from ml_engine.run.optuna_study import open_storage
    from ml_engine.run.study_plots import write_study_plots

    journal = str(sweep_dir / "optuna.journal")
    study = optuna.create_study(
        study_name="ui",
        storage=open_storage(journal),
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.optimize(
        lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) + t.suggest_int("width", 8, 64),
        n_trials=n_trials,
    )
    return write_study_plots(sweep_dir, journal, "ui", target_names=["val/acc_best"])


# the browser tests' Chromium: Debian's package, driven through its chromedriver
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    """One headless Chromium for the module's tests (each start cost a second or more)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    # an explicit driver path: selenium downloads nothing
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium) -> Iterator:
    """The module's Chromium as a fresh one is: afterwards the page's storage is cleared, the
    viewport a test set is undone and the tab left on a blank page."""
    yield chromium
    chromium.delete_all_cookies()
    chromium.execute_script("try { localStorage.clear(); sessionStorage.clear(); } catch (e) {}")
    chromium.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    chromium.get("about:blank")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(app: FastAPI, **options: Any) -> Iterator[str]:
    """uvicorn serving ``app`` in a thread, on 127.0.0.1 and a free port unless ``options``
    (uvicorn.Config's) say otherwise; yields the base URL once it listens."""
    options = {"host": "127.0.0.1", "port": free_port(), "log_level": "warning", **options}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://{options['host']}:{options['port']}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class ServePy:
    """A started ``python serve.py``: its URL, its process and what it has printed so far."""

    url: str
    process: subprocess.Popen
    lines: list[str]

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextmanager
def serve_py(
    log_dir: Path,
    *overrides: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    log_level: str = "warning",
) -> Iterator[ServePy]:
    """``python serve.py`` on loopback as a user starts it: on ``port`` (else a free one), its
    outputs under ``log_dir``, ``ML_ENGINE_API_KEY`` unset unless ``env`` sets it. Yields once it
    answers ``/health``; leaving stops it with Ctrl-C unless it has ended (killed when it does
    not end within 60 s), so ``process.returncode`` is then its exit status."""
    port = port or free_port()
    command = [sys.executable, str(PROJECT_ROOT / "serve.py"), f"port={port}"]
    command += [f"paths.log_dir={log_dir}", f"log_level={log_level}", *overrides]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full_env.pop("ML_ENGINE_API_KEY", None)
    full_env.update(env or {})
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = ServePy(f"http://127.0.0.1:{port}", process, [])

    def drain() -> None:  # read as it comes: a full pipe would block the server
        for line in process.stdout:
            served.lines.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"serve.py exited: {served.output[-3000:]}"
            try:
                httpx.get(f"{served.url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"serve.py did not answer: {served.output}"
                time.sleep(0.2)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)


def wait_for_job(
    client: httpx.Client | TestClient,
    job_id: str,
    statuses: tuple[str, ...],
    timeout: float = 300,
    headers: dict | None = None,
) -> dict[str, Any]:
    """Poll a job until its status is one of ``statuses``; every state seen is recorded."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        job = client.get(f"/ml/jobs/{job_id}", headers=headers).json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        if job["status"] in statuses:
            job["seen"] = seen
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job['status']}: {seen}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def chat_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama GGUF with a name and a ChatML template, as a downloaded instruct model has."""
    from ml_engine.llm.gguf_writer import (
        LlamaShape,
        byte_fallback_vocabulary,
        random_llama_tensors,
        write_llama_gguf,
    )

    shape = LlamaShape(
        n_vocab=512, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=4, n_ctx=512
    )
    chatml = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return write_llama_gguf(
        tmp_path_factory.mktemp("given") / "some-download.Q8.gguf",
        shape,
        byte_fallback_vocabulary(shape.n_vocab),
        random_llama_tensors(shape, seed=5),
        name="Chat Model 0.1 (test)",
        chat_template=chatml,
    )


def corrupt_gguf(path: Path, fault: str) -> Path:
    """A small llama GGUF whose metadata llama.cpp asserts on (it aborts the process):
    ``block_count=0``/``1000`` while loading, ``rms_eps=nan`` on the first decode."""
    from unittest import mock

    import gguf

    from ml_engine.llm.gguf_writer import LlamaShape, write_random_llama

    shape = LlamaShape(
        n_vocab=512, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=4, n_ctx=512
    )
    block_count, rms_eps = gguf.GGUFWriter.add_block_count, gguf.GGUFWriter.add_layer_norm_rms_eps
    faults = {
        "block_count=0": ("add_block_count", lambda self, n: block_count(self, 0)),
        "block_count=1000": ("add_block_count", lambda self, n: block_count(self, 1000)),
        "rms_eps=nan": ("add_layer_norm_rms_eps", lambda self, v: rms_eps(self, float("nan"))),
    }
    name, replacement = faults[fault]
    with mock.patch.object(gguf.GGUFWriter, name, replacement):
        return write_random_llama(path, shape, name=path.stem)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``tmpfs(name, size)`` → a folder on a fresh tmpfs of ``size`` (a real filesystem that
    fills up); the test is skipped where mounting one is not permitted (needs root)."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except OSError as exc:
            pytest.skip(f"cannot mount a tmpfs to fill up here: {exc}")
        if result.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False, timeout=30)


def fill_disk(folder: Path) -> Path:
    """A file that takes every free byte of ``folder``'s filesystem."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 16)
    with filler.open("wb", buffering=0) as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(chunk)
        with contextlib.suppress(OSError):
            while True:  # the last partial chunk
                handle.write(b"\0" * 512)
    with pytest.raises(OSError) as full:
        (folder / "probe").write_bytes(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    (folder / "probe").unlink(missing_ok=True)
    return filler
