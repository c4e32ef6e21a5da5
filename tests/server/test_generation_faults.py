"""Generation when things around it fail: a full disk, a worker that died while idle, and the
token counts of every route that generates."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.server.conftest import fill_disk

TINY = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}


@pytest.fixture
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "models"


def _tokens_generated(client) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("ml_engine_llm_tokens_generated_total{")
    )


@pytest.mark.slow
def test_a_full_disk_is_a_507_naming_the_folder_until_space_returns(
    make_client, tmp_path, tmpfs, models_dir
) -> None:
    disk = tmpfs("serve-disk", "2m")  # the jobs database and the workers' logs live here
    client = make_client(
        **{"paths.models_dir": str(models_dir), "jobs_db": str(disk / "jobs.sqlite")}
    )
    filler = fill_disk(disk)
    refused = client.post("/llm/generate", json=TINY)
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"] == (
        f"no space left in {disk / 'llm_workers'} (the model worker's log); "
        "free some space there and retry"
    )
    openai = client.post("/v1/completions", json={**TINY, "prompt": "Hi"})
    assert openai.status_code == 507 and openai.json()["error"]["code"] == "storage_full"
    assert not any((disk / "llm_workers").glob("*.log"))  # nothing half-written stays
    filler.unlink()
    # space again: the same request works, no restart
    served = client.post("/llm/generate", json=TINY)
    assert served.status_code == 200, served.text
    # a disk that fills while a worker is loaded does not take the worker down with its log
    fill_disk(disk)
    for _ in range(3):
        again = client.post("/llm/generate", json={**TINY, "max_tokens": 16})
        assert again.status_code == 200, again.text
    assert client.app.state.server.llm.load_count == 1


@pytest.mark.slow
def test_a_worker_that_died_while_idle_is_replaced_by_the_next_request(
    make_client, models_dir
) -> None:
    client = make_client(**{"paths.models_dir": str(models_dir)})
    service = client.app.state.server.llm
    assert client.post("/llm/generate", json=TINY).status_code == 200
    worker = next(iter(service._loaded.values())).backend
    os.kill(worker.pid, signal.SIGKILL)  # as the kernel's OOM killer would, while idle
    deadline = time.monotonic() + 10
    while worker.alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for body in (TINY, {**TINY, "stream": True}):
        answer = client.post("/llm/generate", json=body)
        assert answer.status_code == 200, answer.text
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    os.kill(next(iter(service._loaded.values())).backend.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert service.load_count == 3 and service.worker_count() == 1


@pytest.mark.slow
def test_every_route_that_generates_counts_its_tokens(make_client, models_dir) -> None:
    client = make_client(**{"paths.models_dir": str(models_dir)})
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    for path, body in (
        ("/v1/completions", {**TINY, "prompt": "Hi", "max_tokens": 6}),
        ("/v1/chat/completions", chat),
        ("/v1/completions", {**TINY, "prompt": "Hi", "max_tokens": 7, "stream": True}),
        ("/llm/generate", TINY),
    ):
        before = _tokens_generated(client)
        answer = client.post(path, json=body)
        assert answer.status_code == 200, answer.text
        produced = _tokens_generated(client) - before
        if body.get("stream"):
            assert produced == body["max_tokens"]
        elif path.startswith("/v1"):
            assert produced == answer.json()["usage"]["completion_tokens"] > 0
        else:
            assert produced == answer.json()["completion_tokens"] > 0
