"""The missing-model hint names the huggingface_hub CLI this environment has (or how to get it)."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import pytest

from ml_engine.llm.models import download_command, installed_hub_version

REPO, FILE, DIR = "org/Model-GGUF", "Model-Q4_K_M.gguf", Path("models")


@pytest.mark.parametrize(
    ("hub_version", "cli"),
    [
        ("0.23.4", "huggingface-cli"),
        ("0.33.5", "huggingface-cli"),
        ("0.34.0", "hf"),
        ("1.1.2", "hf"),
    ],
)
def test_installed_hub_gets_its_own_cli(hub_version: str, cli: str) -> None:
    command = download_command(REPO, FILE, DIR, hub_version)
    assert command == f"`{cli} download {REPO} {FILE} --local-dir models`"


def test_missing_hub_says_how_to_install_it() -> None:
    command = download_command(REPO, FILE, DIR, None)
    assert '.[hub]"' in command and "pip install" in command  # the extra, for this install
    assert f"`hf download {REPO} {FILE} --local-dir models`" in command


def test_detects_what_is_installed_here() -> None:
    try:
        expected = importlib.metadata.version("huggingface_hub")
    except importlib.metadata.PackageNotFoundError:
        expected = None
    assert installed_hub_version() == expected
    if expected is not None and shutil.which("hf"):  # the CLI the hint names is really there
        assert download_command(REPO, FILE, DIR, expected).startswith("`hf download")
