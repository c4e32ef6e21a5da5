"""Several models: on-demand loads within llm.max_loaded and llm.memory_budget, idle unloads,
/v1/models saying which are loaded, concurrent first requests sharing one load."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest
from omegaconf import OmegaConf

from ml_engine.errors import UserError
from ml_engine.server import create_app
from ml_engine.server.settings import load_settings
from tests.server.conftest import live_server, serve_config

NAMES = ("Alpha", "Beta")


@pytest.fixture(scope="module")
def two_ggufs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from ml_engine.llm.gguf_writer import LlamaShape, write_random_llama

    shape = LlamaShape(
        n_vocab=512, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=2, n_ctx=512
    )
    folder = tmp_path_factory.mktemp("several")
    return [write_random_llama(folder / f"{n}.gguf", shape, name=n) for n in NAMES]


def _loaded(client: openai.OpenAI) -> dict[str, bool]:
    return {m.id: m.model_extra["loaded"] for m in client.models.list().data if m.id in NAMES}


def _complete(client: openai.OpenAI, model: str) -> str:
    answer = client.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body={})
    return answer.choices[0].text


@pytest.mark.slow
def test_models_load_on_demand_evict_unload_when_idle_and_share_a_first_load(
    tmp_path: Path, two_ggufs: list[Path]
) -> None:
    cfg = serve_config(
        tmp_path,
        **{
            "paths.models_dir": str(tmp_path / "models"),
            "llm.files": [str(p) for p in two_ggufs],
            "llm.max_loaded": 1,
            "llm.idle_unload_s": 1,
        },
    )
    app = create_app(cfg)
    with live_server(app) as url:
        service = app.state.server.llm
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert _loaded(client) == {"Alpha": False, "Beta": False}
        # max_loaded=1: each switch evicts the other
        for model in ("Alpha", "Beta", "Alpha"):
            _complete(client, model)
            assert service.worker_count() == 1
            assert _loaded(client) == {n: n == model for n in NAMES}
        assert service.load_count == 3 and service.peak_workers <= 2
        entry = next(m for m in client.models.list().data if m.id == "Alpha")
        assert entry.model_extra["memory_estimate_bytes"] > 0
        # idle for idle_unload_s: unloaded by the service's timer (a deadline, not a timing)
        deadline = time.monotonic() + 60
        while any(_loaded(client).values()):
            assert time.monotonic() < deadline, "the idle model was never unloaded"
            time.sleep(0.2)
        assert service.worker_count() == 0 and service.idle_unloads >= 1
        # two first requests at once: one load, both answered
        before, errors = service.load_count, []

        def ask() -> None:
            try:
                _complete(client, "Beta")
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and service.load_count == before + 1


def test_a_budget_below_the_estimate_is_refused_before_any_worker_starts(
    make_client, tmp_path: Path, two_ggufs: list[Path]
) -> None:
    client = make_client(
        **{
            "paths.models_dir": str(tmp_path / "models"),
            "llm.files": [str(two_ggufs[0])],
            "llm.memory_budget": "1MiB",
        }
    )
    service = client.app.state.server.llm
    body = {"model": "Alpha", "prompt": "Hi", "max_tokens": 2}
    refused = client.post("/v1/completions", json=body)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert "needs an estimated" in message and "llm.memory_budget=1.00 MiB" in message
    assert "\n" not in message
    assert service.load_count == 0 and service.peak_workers == 0
    # and the server keeps serving
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("key", "value"), [("memory_budget", "lots"), ("idle_unload_s", -1), ("max_loaded", 0)]
)
def test_bad_settings_are_one_line(tmp_path: Path, key: str, value: object) -> None:
    cfg = serve_config(tmp_path, **{f"llm.{key}": value})
    with pytest.raises(UserError) as error:
        load_settings(cfg)
    assert str(error.value).startswith(f"llm.{key}=") and "\n" not in str(error.value)
    assert OmegaConf.select(cfg, f"llm.{key}") == value
