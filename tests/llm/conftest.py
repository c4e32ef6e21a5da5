"""Fixtures for generation tests: a session-wide models dir holding the tiny model, small runs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.models import ensure_model_file, model_path
from ml_engine.run.locations import CONFIG_DIR
from tests.conftest import compose_config, run_entrypoint, shrink

# small, quick jobs on the random tiny model (the speed-test model, not the default since the
# packaged shakespeare one): a few tokens, two repetitions, short llama-bench tests and quality
# window, one thread
FAST_OVERRIDES = (
    "llm/model=tiny",
    "llm.max_tokens=8",
    "llm.n_threads=1",
    "llm.n_ctx=512",
    "bench.warmup=1",
    "bench.repetitions=2",
    "bench.n_prompt=16",
    "bench.n_gen=4",
    "quality.n_ctx=64",
    "quality.n_chunks=2",
    "extras.print_config=false",
    "logger=none",
)


def tiny_model_cfg() -> DictConfig:
    return OmegaConf.load(CONFIG_DIR / "llm" / "model" / "tiny.yaml")


def llm_node(quantization: str = "f32", **values: Any) -> dict[str, Any]:
    """A plain ``llm`` node as ``open_backend`` receives it."""
    node = {
        "backend": {"name": "llama_cpp"},
        "model": OmegaConf.to_container(tiny_model_cfg()),
        "quantization": quantization,
        "n_gpu_layers": 0,
        "n_ctx": 512,
        "n_threads": 1,
        "n_batch": 128,
        "flash_attn": False,
        "allow_download": False,
    }
    node.update(values)
    return node


def partial_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.partial"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the session: the tiny f32 is written once, quantizations are added as needed."""
    directory = tmp_path_factory.mktemp("models")
    ensure_model_file(tiny_model_cfg(), "f32", directory)
    return directory


@pytest.fixture(scope="session")
def tiny_f32(models_dir: Path) -> Path:
    return model_path(tiny_model_cfg(), "f32", models_dir)


@pytest.fixture(scope="session")
def tiny_backend(tiny_f32: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(tiny_f32, n_ctx=512, n_threads=1, n_batch=128, ignore_eos=True)
    yield backend
    backend.close()


@pytest.fixture
def gen_cfg(tmp_path: Path, models_dir: Path):
    """``gen_cfg(overrides)`` → a composed ``generate`` config writing under ``tmp_path``."""

    def make(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
        cfg = shrink(compose_config("generate", [*FAST_OVERRIDES, *overrides]), tmp_path / "run")
        with open_dict(cfg):
            cfg.paths.models_dir = str(models_dir)
        return cfg

    return make


def generate_cli(
    *overrides: str, models_dir: Path, outputs: Path, timeout: float = 300, multirun: bool = False
) -> subprocess.CompletedProcess:
    """``python generate.py`` as a user runs it, with fast settings and dirs under the test's."""
    return run_entrypoint(
        "generate.py",
        *(["-m"] if multirun else []),
        *FAST_OVERRIDES,
        f"paths.models_dir={models_dir}",
        f"paths.log_dir={outputs}",
        *overrides,
        timeout=timeout,
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
