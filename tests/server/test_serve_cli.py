"""``python serve.py`` as a user runs it: it serves, and its mistakes end in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from ml_engine.run.locations import PROJECT_ROOT
from tests.conftest import run_entrypoint
from tests.server.conftest import free_port


@pytest.mark.slow
def test_bad_values_end_in_one_line() -> None:
    for override, expected in (
        ("port=99999", "error: port=99999 is not valid; expected an integer in [0, 65535]"),
        ("limits.epochs=[5,1]", "error: limits.epochs=[5, 1] is not valid; expected [low, high]"),
        ("+limits.bogus=3", "error: unknown limit 'bogus'; accepted: max_body_bytes"),
    ):
        result = run_entrypoint("serve.py", override, timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith(expected), result.stderr


@pytest.mark.slow
def test_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_entrypoint("serve.py", f"port={port}", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "choose another with port=<n>"
    )


@pytest.mark.slow
def test_serve_py_serves_on_loopback(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ML_ENGINE_API_KEY": "k"}
    server = subprocess.Popen(
        [
            sys.executable,
            str(PROJECT_ROOT / "serve.py"),
            f"port={port}",
            f"paths.log_dir={tmp_path}",
            "log_level=warning",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                health = httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert health.json() == {"service": "ml-engine", "status": "ok"}
        assert httpx.get(f"{url}/ml/jobs").status_code == 401  # key from the environment
        jobs = httpx.get(f"{url}/ml/jobs", headers={"Authorization": "Bearer k"})
        assert jobs.json() == {"jobs": []}
        assert (tmp_path / "serve" / "jobs.sqlite").is_file()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    assert server.returncode == 0
