"""A built wheel, installed into a fresh venv, runs every entrypoint from outside the repo."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from ml_engine.run.group_options import SLURM, is_importable
from tests.conftest import PROJECT_ROOT
from tests.venvs import clean_env, make_child_venv

# the page, and the chart library it loads from the server (uPlot, vendored with its license)
STATIC_FILES = (
    "index.html",
    "app.js",
    "style.css",
    "uPlot.iife.min.js",
    "uPlot.min.css",
    "uPlot.LICENSE",
)
TRAIN_FAST = (
    "datamodule.source=bundled",
    "trainer.accelerator=cpu",
    "extras.print_config=false",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
)
LM_FAST = (
    "experiment=shakespeare_char",
    "datamodule.max_chars=20000",
    "datamodule.train_batches=20",
    "model.net.n_layer=1",
    "trainer.max_epochs=1",
    "extras.print_config=false",
    "logger=none",
)
# the mock backend loads no model: generation runs offline, in a second
GENERATE_MOCK = (
    "llm/backend=mock",
    "prompt=one two three",
    "llm.max_tokens=8",
    "bench.repetitions=1",
    "extras.print_config=false",
    "logger=none",
)


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    return done


def run_dir_printed(done: subprocess.CompletedProcess) -> Path:
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), done.stdout[-2000:]
    return Path(last.removeprefix("run_dir: "))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[1][-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {timeout} s")


def serve_and_check(ml_engine: Path, work: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [str(ml_engine), "serve", f"port={port}", "extras.print_config=false"],
        cwd=work,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for_health(f"http://127.0.0.1:{port}/health", server)["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert "<html" in response.read().decode().lower()  # the packaged UI
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/app.js", timeout=10) as r:
            assert r.status == 200
    finally:
        server.terminate()
        server.communicate(timeout=30)


@pytest.mark.slow
def test_wheel_runs_every_entrypoint_outside_the_repo(
    tmp_path: Path, project_wheel: Path, digit_pngs
) -> None:
    wheel = project_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"ml_engine/conf/{p.relative_to(PROJECT_ROOT / 'conf')}"
        for p in (PROJECT_ROOT / "conf").rglob("*.yaml")
    }
    assert configs and configs <= names, sorted(configs - names)
    assert {f"ml_engine/server/static/{f}" for f in STATIC_FILES} <= names
    assert "ml_engine/training/lm/corpora/tinyshakespeare.txt" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    venv = tmp_path / "venv"
    make_child_venv(venv, with_project=False)
    python, ml_engine = venv / "bin" / "python", venv / "bin" / "ml-engine"
    run(
        [str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
        cwd=tmp_path,
    )
    work = tmp_path / "work"
    work.mkdir()
    where = run(
        [
            str(python),
            "-c",
            "import ml_engine.run.locations as c; print(c.__file__); print(c.CONFIG_DIR)",
        ],
        cwd=work,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's, not the repo's

    trained = run_dir_printed(run([str(ml_engine), "train", *TRAIN_FAST], cwd=work))
    assert trained.parent == work / "outputs" / "train" / "runs"
    best = trained / "checkpoints" / "best.ckpt"
    assert best.is_file()

    evaluated = run(
        [
            str(ml_engine),
            "eval",
            f"ckpt_path={best}",
            *TRAIN_FAST[:3],
            "trainer.limit_test_batches=2",
        ],
        cwd=work,
    )
    assert "test/acc" in evaluated.stdout
    assert run_dir_printed(evaluated).parent == work / "outputs" / "eval" / "runs"

    # the language model reads the corpus packaged in the wheel
    lm_run = run_dir_printed(run([str(ml_engine), "train", *LM_FAST], cwd=work))
    lm_metrics = json.loads((lm_run / "job.json").read_text())["metrics"]
    assert lm_metrics["data_source"] == "tinyshakespeare.txt" and lm_metrics["val/loss"] < 5
    exported = run(
        [str(ml_engine), "export", f"ckpt_path={lm_run / 'checkpoints' / 'best.ckpt'}"], cwd=work
    )
    gguf_file = Path(exported.stdout.strip().splitlines()[-1].removeprefix("gguf: "))
    assert gguf_file.parent == lm_run and (work / gguf_file).stat().st_size > 0

    folder, expected = digit_pngs
    predicted = run_dir_printed(
        run([str(ml_engine), "predict", f"ckpt_path={best}", f"input={folder}"], cwd=work)
    )
    with (predicted / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(expected)

    generated = run_dir_printed(
        run(
            [str(python), "-m", "ml_engine", "generate", *GENERATE_MOCK],
            cwd=work,
        )
    )
    assert json.loads((generated / "result.json").read_text())["backend"] == "mock"

    serve_and_check(ml_engine, work)
    if not is_importable(SLURM.module):  # an installed package names the extra on PyPI
        refused = subprocess.run(
            [str(ml_engine), "train", "-m", "hydra/launcher=slurm", "seed=1,2"],
            cwd=work,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert 'pip install "ml-engine[slurm]"' in refused.stderr.strip().splitlines()[-1]
