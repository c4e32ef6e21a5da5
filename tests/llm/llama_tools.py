"""llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built
against the installed wheel's libraries by ``bench/build-llama-tools``: the real consumers our
imatrix and GGUF files are checked with. Built once per wheel and cached (.ci/run builds them
before the tests; a local run builds them on first use, about 1.5 min on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "build-llama-tools"


@pytest.fixture(scope="session")
def llama_tools() -> Path:
    """The folder holding the three binaries."""
    # the venv's python first: the script builds against the llama_cpp this interpreter imports
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])
