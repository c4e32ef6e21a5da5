"""Issue 27's "done when": each bad request an app may send (a malformed schema, a tool_choice
naming a missing tool, embeddings of nothing, a model past llm.memory_budget) is a 4xx of one
line in OpenAI's error shape, and the same server answers a normal chat afterwards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from ml_engine.llm.memory_fit import estimate
from ml_engine.server import create_app
from tests.conftest import compose_config
from tests.server.conftest import live_server, serve_config

MESSAGES = [{"role": "user", "content": "Hi"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def small_and_big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two GGUFs whose estimates differ by tens of MiB, so a budget fits one and not the other."""
    from ml_engine.llm.gguf_writer import LlamaShape, write_random_llama

    folder = tmp_path_factory.mktemp("budget")
    small = LlamaShape(
        n_vocab=512, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=2, n_ctx=512
    )
    big = LlamaShape(
        n_vocab=2048, n_embd=512, n_ff=1536, n_layer=2, n_head=4, n_head_kv=4, n_ctx=512
    )
    return (
        write_random_llama(folder / "Small.gguf", small, name="Small"),
        write_random_llama(folder / "Big.gguf", big, name="Big"),
    )


def _refused(call: Callable[[], object], status: int, fragment: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    assert caught.value.status_code == status, caught.value
    body = caught.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    message = body["error"]["message"]
    assert fragment in message and "\n" not in message, message
    assert body["error"]["type"] == "invalid_request_error", body


def test_bad_requests_are_one_line_4xx_and_the_server_keeps_serving(
    tmp_path: Path, small_and_big: tuple[Path, Path]
) -> None:
    small, big = small_and_big
    cfg = serve_config(
        tmp_path,
        **{"paths.models_dir": str(tmp_path / "models"), "llm.files": [str(small), str(big)]},
    )
    # the budget halfway between the two estimates, made for the llm node the server composes
    # for these files (its n_ctx and n_batch)
    llm = compose_config("generate", []).llm  # llm.config_name: the node a served model gets
    n_ctx, n_batch = int(llm.n_ctx or 0), int(llm.get("n_batch") or 512)
    small_bytes = estimate(small, n_ctx, n_batch=n_batch).total_bytes
    big_bytes = estimate(big, n_ctx, n_batch=n_batch).total_bytes
    assert big_bytes > small_bytes
    cfg.llm.memory_budget = (small_bytes + big_bytes) // 2
    app = create_app(cfg)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}
        _refused(
            lambda: client.chat.completions.create(
                model="Small", messages=MESSAGES, max_tokens=4, response_format=schema
            ),
            400,
            "strnig",
        )
        _refused(
            lambda: client.chat.completions.create(
                model="Small",
                messages=MESSAGES,
                max_tokens=4,
                tools=[TOOL],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            ),
            400,
            "nope",
        )
        _refused(lambda: client.embeddings.create(model="Small", input=[]), 400, "empty list")
        _refused(
            lambda: client.chat.completions.create(model="Big", messages=MESSAGES, max_tokens=4),
            400,
            "needs an estimated",
        )
        assert app.state.server.llm.load_count == 0  # every refusal came before any load
        reply = client.chat.completions.create(
            model="Small", messages=MESSAGES, max_tokens=4, seed=1
        )
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length") and choice.message.content is not None
        assert reply.usage.completion_tokens >= 1
