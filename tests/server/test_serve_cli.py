"""``python serve.py`` as a user runs it: it serves, and its mistakes end in one line."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.conftest import run_entrypoint
from tests.server.conftest import serve_py


# quick since serve.py checks its values before importing the app (about 2 s each)
def test_bad_values_end_in_one_line() -> None:
    for override, expected in (
        ("port=99999", "error: port=99999 is not valid; expected an integer in [0, 65535]"),
        ("limits.epochs=[5,1]", "error: limits.epochs=[5, 1] is not valid; expected [low, high]"),
        ("+limits.bogus=3", "error: unknown limit 'bogus'; accepted: max_body_bytes"),
        (
            "log_level=nope",
            "error: log_level='nope' is not valid; accepted: critical, error, warning, info",
        ),
    ):
        result = run_entrypoint("serve.py", override, timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith(expected), result.stderr


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
    with serve_py(tmp_path, env={"ML_ENGINE_API_KEY": "k"}) as served:
        health = httpx.get(f"{served.url}/health", timeout=10)
        assert health.json() == {"service": "ml-engine", "status": "ok"}
        assert httpx.get(f"{served.url}/ml/jobs").status_code == 401  # key from the environment
        jobs = httpx.get(f"{served.url}/ml/jobs", headers={"Authorization": "Bearer k"})
        assert jobs.json() == {"jobs": []}
        assert (tmp_path / "serve" / "jobs.sqlite").is_file()
    assert served.process.returncode == 0, served.output  # Ctrl-C stops it cleanly
