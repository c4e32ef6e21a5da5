"""Property-based fuzz of the API from its own OpenAPI schema (schemathesis) on loopback:
no request may produce a 5xx, and the server is alive afterwards."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from ml_engine.server import create_app
from tests.serve.conftest import live_server, serve_config

pytestmark = pytest.mark.slow

# cheap jobs: the fuzzer queues many trainings; each runs a single batch at most
FUZZ_JOB_OVERRIDES = [
    "++trainer.limit_train_batches=1",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "++trainer.max_epochs=1",
]

STATUSES: list[tuple[str, int]] = []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, trained_runs: Path) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    runs = tmp_path / "runs"
    shutil.copytree(trained_runs, runs)  # the jobs the fuzzer queues train here, not there
    cfg = serve_config(
        tmp_path,
        runs_dir=runs,
        **{"paths.models_dir": str(tmp_path / "models"), "limits.max_body_bytes": 262144},
    )
    cfg.jobs.extra_overrides = [*cfg.jobs.extra_overrides, *FUZZ_JOB_OVERRIDES]
    with live_server(create_app(cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_makes_a_server_error(case, fuzz_server: str) -> None:
    response = case.call(base_url=fuzz_server, timeout=60)
    STATUSES.append((f"{case.method} {case.path}", response.status_code))
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        if case.path.startswith("/v1/"):  # the OpenAI-compatible API: OpenAI's error shape
            assert isinstance(error["message"], str) and "type" in error
        else:
            assert isinstance(error, str)


def test_server_alive_after_fuzzing(fuzz_server: str) -> None:
    counts: dict[tuple[str, int], int] = {}
    for key in STATUSES:
        counts[key] = counts.get(key, 0) + 1
    print("fuzz responses:", sorted(counts.items()))
    assert len(STATUSES) > 50, "the fuzzer sent too few requests to mean anything"
    assert all(code < 500 for _, code in STATUSES)
    assert any(400 <= code < 500 for _, code in STATUSES)
    response = httpx.get(f"{fuzz_server}/health", timeout=10)
    assert response.json() == {"service": "ml-engine", "status": "ok"}
    with httpx.Client(base_url=fuzz_server, timeout=60) as client:
        for job in client.get("/ml/jobs", params={"limit": 1000}).json()["jobs"]:
            if job["status"] in ("queued", "running"):
                client.delete(f"/ml/jobs/{job['id']}")
