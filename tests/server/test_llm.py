"""/llm endpoints with the mock backend and the embedded tiny GGUF, streaming included."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ml_engine.server.llm_service import LlmKey


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-models")


@pytest.fixture
def client(make_client, models_dir):
    return make_client(**{"paths.models_dir": str(models_dir)})


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_generate_mock_has_the_original_response_shape(client) -> None:
    body = {"backend": "mock", "model": "tiny", "prompt": "one two three four", "max_tokens": 3}
    response = client.post("/llm/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["engine"] == "mock" and result["output"] == "one two three"
    assert result["prompt"] == body["prompt"] and result["params"]["max_tokens"] == 3
    assert result["prompt_tokens"] == 4 and result["completion_tokens"] == 3
    assert result["finish_reason"] == "length"
    assert set(result["timings"]) >= {"prompt_eval_s", "gen_s", "ttft_s"}


def test_generate_stream_mock(client) -> None:
    body = {"backend": "mock", "model": "tiny", "prompt": "a b c", "max_tokens": 8, "stream": True}
    with client.stream("POST", "/llm/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert [kind for kind, _ in events] == ["token", "token", "token", "done"]
    assert "".join(data["token"] for kind, data in events if kind == "token") == "a b c"
    done = events[-1][1]
    assert done["output"] == "a b c" and done["engine"] == "mock" and done["pieces"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama_cpp", "llama"])
def test_generate_tiny_gguf(client, backend: str) -> None:
    body = {"backend": backend, "model": "tiny", "prompt": "Hello", "max_tokens": 12, "seed": 7}
    first = client.post("/llm/generate", json=body)
    assert first.status_code == 200, first.text
    result = first.json()
    assert result["engine"] == "llama_cpp" and result["quantization"] == "q4_k_m"
    assert result["completion_tokens"] == 12 and result["prompt_tokens"] > 0
    assert result["timings"]["gen_s"] >= 0
    # fixed seed: the same text again, from the cached model
    assert client.post("/llm/generate", json=body).json()["output"] == result["output"]


@pytest.mark.slow
def test_generate_tiny_gguf_streams_the_same_text(client) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 10, "seed": 3, "temperature": 0}
    whole = client.post("/llm/generate", json=body).json()["output"]
    with client.stream("POST", "/llm/generate", json={**body, "stream": True}) as response:
        events = sse_events(response.read().decode())
    assert events[-1][0] == "done"
    streamed = "".join(d["token"] for kind, d in events if kind == "token")
    assert streamed == events[-1][1]["output"] == whole


@pytest.mark.slow
def test_pieces_sent_together_still_stream_one_token_event_each(
    make_client, models_dir, tmp_path: Path
) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 40, "temperature": 0}
    streams = []
    for interval_ms in (0, 1000):  # a message per token; all but the first in one message
        client = make_client(
            **{
                "paths.models_dir": str(models_dir),
                "llm.stream_interval_ms": interval_ms,
                "jobs_db": str(tmp_path / f"jobs-{interval_ms}.sqlite"),  # a server each
            }
        )
        whole = client.post("/llm/generate", json=body).json()
        with client.stream("POST", "/llm/generate", json={**body, "stream": True}) as response:
            events = sse_events(response.read().decode())
        tokens = [d["token"] for kind, d in events if kind == "token"]
        assert "".join(tokens) == events[-1][1]["output"] == whole["output"]
        assert whole["completion_tokens"] == 40
        streams.append(tokens)
    # the same pieces, one event each (a token whose bytes end mid-character has none alone)
    assert streams[0] == streams[1] and len(streams[0]) > 30


def test_the_worker_sends_the_first_piece_at_once_then_a_message_per_interval() -> None:
    from ml_engine.server.llm_worker import Worker

    class Pieces:
        def piece(self, token: int) -> bytes:
            return f"<{token}>".encode()

    class NoRequests:
        def next(self, block: bool = True) -> None:
            return None

    def sent(interval_s: float) -> list[dict]:
        worker = Worker(out_fd=-1, requests=NoRequests())  # type: ignore[arg-type]
        worker.backend, messages = Pieces(), []
        worker.send = messages.append  # type: ignore[method-assign]
        produced, cancelled = worker._relay((t for t in range(5)), True, interval_s)
        assert produced == [0, 1, 2, 3, 4] and not cancelled
        return messages

    assert sent(0.0) == [{"t": f"<{i}>"} for i in range(5)]
    assert sent(60.0) == [{"t": "<0>"}, {"ts": ["<1>", "<2>", "<3>", "<4>"]}]


@pytest.mark.slow
def test_llm_models_lists_quantizations_on_disk(client) -> None:
    client.post("/llm/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    body = client.get("/llm/models").json()
    assert body["backends"] == ["llama_cpp", "mock"]
    models = {m["name"]: m for m in body["models"]}
    assert "q4_k_m" in models["tiny"]["quantizations_on_disk"]
    assert models["tiny"]["default_quantization"] == "q4_k_m"
    assert models["tiny"]["file_on_disk"] and models["tiny"]["embedded"]


def test_llm_models_default_to_a_model_with_a_file(make_client, tmp_path: Path) -> None:
    models_dir = tmp_path / "empty-models"
    client = make_client(**{"paths.models_dir": str(models_dir)})
    body = client.get("/llm/models").json()
    models = {m["name"]: m for m in body["models"]}
    # nothing downloaded: the packaged model trained here (its file ships with the package),
    # not the embedded model's random weights, never the first name sorted
    on_disk = [name for name, m in models.items() if m["file_on_disk"]]
    assert on_disk == ["shakespeare"] and models["shakespeare"]["packaged"]
    assert [name for name, m in models.items() if m["embedded"]] == ["tiny"]
    assert body["default_model"] == "shakespeare"

    # a model file of the user's wins over the packaged one and the embedded random weights
    models_dir.mkdir()
    (models_dir / "Mistral-7B-Instruct-v0.3-Q4_K_M.gguf").write_bytes(b"GGUF")
    body = client.get("/llm/models").json()
    models = {m["name"]: m for m in body["models"]}
    assert models["mistral_7b"]["file_on_disk"] and models["mistral_7b"]["embedded"] is False
    assert not models["codellama_7b"]["file_on_disk"]
    assert body["default_model"] == "mistral_7b"


def test_llm_models_default_is_null_when_no_model_has_a_file(make_client, tmp_path) -> None:
    client = make_client(
        **{"paths.models_dir": str(tmp_path / "none"), "llm.models": ["codellama_7b", "mistral_7b"]}
    )
    body = client.get("/llm/models").json()
    assert [m["name"] for m in body["models"]] == ["codellama_7b", "mistral_7b"]
    assert not any(m["file_on_disk"] for m in body["models"])
    assert body["default_model"] is None


@pytest.mark.parametrize(
    ("change", "status", "expected"),
    [
        ({"llama_exec_path": "/usr/bin/sh"}, 422, "unknown field(s): llama_exec_path; accepted:"),
        ({"extra_args": ["-e", "rm"]}, 422, "unknown field(s): extra_args"),
        ({"backend": "vllm"}, 422, "backend"),
        ({"model": "../../etc/passwd"}, 422, "is not a name"),
        ({"model": "/abs/model.gguf"}, 422, "is not a name"),
        ({"model": "gpt5"}, 422, "unknown llm model 'gpt5'; accepted:"),
        ({"quantization": "../q8"}, 422, "is not a name"),
        ({"quantization": "q9_z"}, 422, "unknown quantization 'q9_z'"),
        ({"model": "llama3_1_8b"}, 422, "is not on disk"),
        ({"max_tokens": 0}, 422, "max_tokens=0 is out of range; allowed: [1, 2048]"),
        ({"max_tokens": 10**6}, 422, "allowed: [1, 2048]"),
        ({"n_ctx": 64}, 422, "n_ctx=64 is out of range; allowed: [128, 8192]"),
        ({"n_gpu_layers": -5}, 422, "n_gpu_layers=-5 is out of range"),
        ({"prompt": ""}, 422, "prompt is empty"),
        ({"prompt": "x" * 9000}, 422, "prompt has 9000 characters; allowed: [1, 8192]"),
        ({"temperature": -1}, 422, "temperature"),
        ({"stream": "maybe"}, 422, "stream"),
    ],
)
def test_generate_rejects(client, change: dict, status: int, expected: str) -> None:
    body = {"backend": "llama_cpp", "model": "tiny", "prompt": "Hi", "max_tokens": 4, **change}
    response = client.post("/llm/generate", json=body)
    assert response.status_code == status, response.text
    assert expected in response.json()["error"]


def test_requests_to_one_model_are_serialized(client, models_dir) -> None:
    """Concurrent requests on one loaded model never overlap inside the backend."""
    service = client.app.state.server.llm
    key = LlmKey("mock", "tiny", None, None, None)
    loaded = service.acquire(key)
    inside, overlaps = [0], [0]
    original = loaded.backend.complete

    def guarded(*args, **kwargs):
        inside[0] += 1
        overlaps[0] = max(overlaps[0], inside[0])
        try:
            threading.Event().wait(0.02)
            return original(*args, **kwargs)
        finally:
            inside[0] -= 1

    loaded.backend.complete = guarded
    service.release(loaded)
    body = {"backend": "mock", "model": "tiny", "prompt": "a b", "max_tokens": 2}
    threads = [
        threading.Thread(target=lambda: client.post("/llm/generate", json=body)) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps[0] == 1


@pytest.mark.slow
def test_a_stream_releases_the_model_however_it_ends(client) -> None:
    """Read to the end, stopped early (client hung up) or never started: the lock is free."""
    service = client.app.state.server.llm
    key = LlmKey("llama_cpp", "tiny", None, None, None)
    sampling = {"max_tokens": 50, "temperature": 0.8, "top_k": 40, "top_p": 0.95}

    def lock_after(consume) -> bool:
        loaded = service.acquire(key)
        stream = service.stream_loaded(loaded, "Hello", sampling)
        assert loaded.lock.locked()
        consume(stream)
        return loaded.lock.locked()

    assert not lock_after(lambda stream: list(stream))
    assert not lock_after(lambda stream: (next(stream), stream.close()))
    assert not lock_after(lambda stream: stream.close())


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_a_422(client, stream: bool) -> None:
    body = {"model": "tiny", "prompt": "word " * 400, "n_ctx": 128, "stream": stream}
    response = client.post("/llm/generate", json=body)
    assert response.status_code == 422
    assert "context holds" in response.json()["error"]
    # and the model is free for the next request
    ok = client.post("/llm/generate", json={**body, "prompt": "word", "stream": False})
    assert ok.status_code == 200


# ---- any GGUF: llm.files


@pytest.mark.slow
def test_a_given_gguf_is_a_model_named_by_its_metadata(make_client, chat_gguf, tmp_path) -> None:
    client = make_client(
        **{"paths.models_dir": str(tmp_path / "models"), "llm.files": [str(chat_gguf)]}
    )
    body = client.get("/llm/models").json()
    models = {m["name"]: m for m in body["models"]}
    entry = models["Chat-Model-0.1-test"]
    assert entry["file"] == str(chat_gguf) and entry["exported"] is False
    assert entry["quantizations_on_disk"] == ["f32"] and entry["file_on_disk"]
    # a real file on disk is what a client should preselect, not the embedded random weights
    assert body["default_model"] == "Chat-Model-0.1-test"
    request = {"model": entry["name"], "prompt": "Hi", "max_tokens": 6, "temperature": 0}
    answer = client.post("/llm/generate", json=request)
    assert answer.status_code == 200, answer.text
    # the file's chat template was applied: its markers are in the evaluated prompt (one
    # token per byte in this vocabulary: "Hi" alone is 3 with BOS)
    assert answer.json()["prompt_tokens"] > len("<|im_start|>user\nHi<|im_end|>\n")
    with client.stream("POST", "/llm/generate", json={**request, "stream": True}) as response:
        events = sse_events(response.read().decode())
    assert events[-1][1]["output"] == answer.json()["output"]
    # a quantization that is not on disk is refused (an operator's produce_missing decides)
    missing = client.post("/llm/generate", json={**request, "quantization": "q4_k_m"})
    assert missing.status_code == 422 and "not on disk" in missing.text


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "no such file"), (b"not a gguf" * 20, "is not a readable GGUF file")],
)
def test_a_given_file_that_is_no_gguf_stops_the_server_in_one_line(
    content: bytes | None, expected: str, tmp_path: Path
) -> None:
    from ml_engine.errors import UserError
    from ml_engine.server import create_app
    from tests.server.conftest import serve_config

    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    cfg = serve_config(tmp_path, **{"llm.files": [str(path)]})
    with pytest.raises(UserError) as raised:
        create_app(cfg)
    message = str(raised.value)
    assert f"llm.files[0]={path}" in message and expected in message and "\n" not in message


def test_a_composed_config_is_a_copy_its_caller_may_change() -> None:
    from omegaconf import open_dict

    from ml_engine.server.llm_service import compose_config

    first = compose_config("generate", ["llm/model=tiny"])
    with open_dict(first):
        first.llm.model.name = "changed by a caller"
    again = compose_config("generate", ["llm/model=tiny"])
    assert again.llm.model.name == "tiny"
    assert compose_config("generate", ["llm/model=tiny", "llm.n_ctx=256"]).llm.n_ctx == 256
