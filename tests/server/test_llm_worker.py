"""llama.cpp in worker processes: a file that aborts llama.cpp fails its request, not the
server; cancelling a stream frees the model; the cache of loaded contexts stays bounded."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from ml_engine.server.llm_service import LlmKey
from tests.server.conftest import JOB_OVERRIDES, corrupt_gguf, serve_py, wait_for_job

GREEDY = {"max_tokens": 2000, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 1}


@pytest.mark.slow
def test_a_gguf_that_aborts_llama_cpp_fails_its_request_not_the_server(
    tmp_path: Path, chat_gguf: Path
) -> None:
    bad_load = corrupt_gguf(tmp_path / "abort-on-load.gguf", "block_count=0")
    bad_many = corrupt_gguf(tmp_path / "abort-on-1000.gguf", "block_count=1000")
    bad_decode = corrupt_gguf(tmp_path / "abort-on-decode.gguf", "rms_eps=nan")
    files = ",".join(str(p) for p in (bad_load, bad_many, bad_decode, chat_gguf))
    jobs = ",".join(f"'{o}'" for o in JOB_OVERRIDES)
    overrides = [f"paths.models_dir={tmp_path / 'models'}", f"jobs.extra_overrides=[{jobs}]"]
    # serve.py in its own process: an abort inside it cannot take pytest along
    with (
        serve_py(tmp_path, *overrides, f"llm.files=[{files}]") as served,
        httpx.Client(base_url=served.url, timeout=300) as client,
    ):
        job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 2}).json()
        wait_for_job(client, job["id"], ("running", "succeeded", "failed"))
        listed = {m["name"]: m for m in client.get("/llm/models").json()["models"]}
        assert listed["abort-on-load"]["usable"] is None  # untried: not claimed usable

        request = {"prompt": "Hi", "max_tokens": 4, "temperature": 0}
        for path, model in ((bad_load, "abort-on-load"), (bad_many, "abort-on-1000")):
            failed = client.post("/llm/generate", json={**request, "model": model})
            assert failed.status_code == 502, failed.text
            error = failed.json()["error"]
            assert str(path) in error and "killed by SIGABRT" in error, error
            assert "GGML_ASSERT(hparams.n_layer_all > 0" in error and "\n" not in error

        crashed = client.post("/llm/generate", json={**request, "model": "abort-on-decode"})
        assert crashed.status_code == 502 and "GGML_ASSERT(eps >= 0.0f)" in crashed.text
        body = {**request, "model": "abort-on-decode", "stream": True}
        streamed = client.post("/llm/generate", json=body)
        # the first token is taken before the stream answers: a plain 502 too
        assert streamed.status_code == 502 and "killed by SIGABRT" in streamed.text

        good = client.post("/llm/generate", json={**request, "model": "Chat-Model-0.1-test"})
        assert good.status_code == 200, good.text
        again = client.post("/llm/generate", json={**request, "model": "Chat-Model-0.1-test"})
        assert again.json()["output"] == good.json()["output"]

        listing = client.get("/llm/models").json()
        models = {m["name"]: m for m in listing["models"]}
        assert models["abort-on-load"]["usable"] is False
        assert "SIGABRT" in models["abort-on-load"]["error"]
        assert models["Chat-Model-0.1-test"]["usable"] is True
        assert listing["default_model"] == "Chat-Model-0.1-test"

        finished = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"))
        assert finished["status"] == "succeeded", finished
    assert served.process.returncode == 0, served.output[-3000:]


@pytest.fixture
def client(make_client, tmp_path_factory):
    return make_client(**{"paths.models_dir": str(tmp_path_factory.getbasetemp() / "models")})


@pytest.mark.slow
def test_cancelling_a_stream_stops_the_worker_between_tokens(client) -> None:
    service = client.app.state.server.llm
    key = LlmKey("llama_cpp", "tiny", None, None, None)
    loaded = service.acquire(key)
    stream = service.stream_loaded(loaded, "Hello", GREEDY)
    next(stream), next(stream)
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 5
    assert stream.stats["finish_reason"] == "cancelled"
    assert stream.stats["completion_tokens"] < 1000
    assert not loaded.lock.locked()
    # the same worker answers the next request in full
    whole = client.post("/llm/generate", json={"model": "tiny", "prompt": "Hi", "max_tokens": 8})
    assert whole.status_code == 200 and whole.json()["completion_tokens"] == 8
    assert service.load_count == 1


@pytest.mark.slow
def test_a_client_hanging_up_mid_stream_frees_the_model(make_client, tmp_path) -> None:
    from ml_engine.server import create_app
    from tests.server.conftest import live_server, serve_config

    app = create_app(serve_config(tmp_path, **{"paths.models_dir": str(tmp_path / "models")}))
    service = app.state.server.llm
    body = {"model": "tiny", "prompt": "Hello", "stream": True, **GREEDY}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/llm/generate", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
        # the worker stops between two tokens: the model is free well before 2000 tokens
        deadline = time.monotonic() + 10
        entry = next(iter(service._loaded.values()))
        while entry.lock.locked():
            assert time.monotonic() < deadline, "the stream's generation did not stop"
            time.sleep(0.05)
        answer = http.post("/llm/generate", json={**body, "stream": False, "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["completion_tokens"] == 4
    assert service.load_count == 1


@pytest.mark.slow
def test_contexts_of_different_sizes_reuse_a_loaded_one_and_stay_bounded(make_client, tmp_path):
    client = make_client(**{"paths.models_dir": str(tmp_path / "models"), "llm.cache_size": 2})
    service = client.app.state.server.llm
    sizes = [256, 512, 384, 1024, 300, 2048, 128, 1500, 700, 1024, 256]
    for n_ctx in sizes:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "n_ctx": n_ctx}
        assert client.post("/llm/generate", json=body).status_code == 200
        assert service.worker_count() <= 2
    # a load for each new largest context only; every other request fits a loaded one
    assert service.load_count == 4
    assert service.peak_workers <= 2
    # a prompt longer than the request's n_ctx is still refused, whatever context is loaded
    long = {"model": "tiny", "prompt": "word " * 40, "n_ctx": 128, "max_tokens": 2}
    refused = client.post("/llm/generate", json=long)
    assert refused.status_code == 422 and "context holds 128" in refused.json()["error"]


@pytest.mark.slow
def test_the_memory_budget_drops_the_least_recently_used_worker(make_client, tmp_path, chat_gguf):
    client = make_client(
        **{
            "paths.models_dir": str(tmp_path / "models"),
            "llm.cache_size": 3,
            "llm.cache_mb": 1,  # below any worker's size: the newest alone stays
            "llm.files": [str(chat_gguf)],
        }
    )
    service = client.app.state.server.llm
    for model in ("tiny", "Chat-Model-0.1-test", "tiny"):
        body = {"model": model, "prompt": "Hi", "max_tokens": 2}
        assert client.post("/llm/generate", json=body).status_code == 200
        assert service.worker_count() == 1
    assert service.load_count == 3 and service.peak_workers <= 2
    models = json.loads(client.get("/llm/models").text)["models"]
    assert {m["name"]: m["usable"] for m in models}["Chat-Model-0.1-test"] is True


@pytest.mark.slow
def test_a_worker_that_stops_answering_is_killed_and_the_next_request_gets_a_fresh_one(
    make_client, tmp_path
) -> None:
    client = make_client(
        **{"paths.models_dir": str(tmp_path / "models"), "llm.worker_timeout_s": 2}
    )
    service = client.app.state.server.llm
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    assert client.post("/llm/generate", json=body).status_code == 200
    worker = next(iter(service._loaded.values())).backend
    os.kill(worker.pid, signal.SIGSTOP)  # as a deadlock in llama.cpp would: alive, silent
    started = time.monotonic()
    hung = client.post("/llm/generate", json=body)
    assert hung.status_code == 504, hung.text
    assert hung.json()["error"] == (
        "the model worker for model 'tiny' (q4_k_m) did not answer within 2 s "
        "(llm.worker_timeout_s) and was killed"
    )
    assert time.monotonic() - started < 20
    assert not worker.alive()
    streamed = client.post("/llm/generate", json={**body, "stream": True})
    assert streamed.status_code == 200 and "event: done" in streamed.text
    assert service.load_count == 2 and service.worker_count() == 1


def test_an_unusable_worker_timeout_is_one_line(make_client, tmp_path) -> None:
    from ml_engine.errors import UserError

    with pytest.raises(UserError, match=r"llm.worker_timeout_s=0 is not valid; expected sec"):
        make_client(**{"paths.models_dir": str(tmp_path / "models"), "llm.worker_timeout_s": 0})
