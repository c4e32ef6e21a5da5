"""/v1: the OpenAI-compatible API, through the official ``openai`` client on a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ml_engine.server import create_app
from tests.server.conftest import live_server, serve_config

KEY = "sk-test"
CHAT = "Chat-Model-0.1-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chat_gguf: Path) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("openai")
    cfg = serve_config(
        tmp,
        **{"paths.models_dir": str(tmp / "models"), "llm.files": [str(chat_gguf)], "api_key": KEY},
    )
    with live_server(create_app(cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "More?"},
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "template"), [(CHAT, "model"), ("tiny", "chatml")])
def test_chat_whole_and_streamed(client: openai.OpenAI, model: str, template: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, seed=1
    )
    # the file's own template when it has one; else llama.cpp's chatml, and the header says so
    assert raw.headers["x-chat-template"].startswith(template)
    whole = raw.parse()
    assert whole.object == "chat.completion" and whole.model == model
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # every message went through the template: far more tokens than the last one alone
    assert whole.usage.prompt_tokens > len("More?") + 20
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_completions_stream_and_stop(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="Once", max_tokens=24, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24
    text = whole.choices[0].text
    streamed = client.completions.create(
        model="tiny", prompt="Once", max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text

    stop = text[6:9]
    cut = text[: text.index(stop)]
    for stops in (stop, [stop, "never-produced"]):
        stopped = client.completions.create(
            model="tiny", prompt="Once", max_tokens=24, temperature=0, stop=stops
        )
        assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
        pieces = client.completions.create(
            model="tiny", prompt="Once", max_tokens=24, temperature=0, stop=stops, stream=True
        )
        chunks = list(pieces)
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_lists_every_usable_gguf(client: openai.OpenAI) -> None:
    ids = {model.id: model for model in client.models.list()}
    assert {"tiny", CHAT} <= set(ids)
    assert ids[CHAT].owned_by == "llm.files" and ids[CHAT].created > 0
    assert "llama3_1_8b" not in ids  # configured, but no file on disk


@pytest.mark.slow
def test_errors_have_openai_shape(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2)
    assert raised.value.message.endswith("n=2 is not supported; only n=1")
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    plain = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert plain.status_code == 401
    error = plain.json()["error"]
    assert set(error) >= {"message", "type", "code"} and "\n" not in error["message"]
    bad = httpx.post(
        f"{server}/v1/completions",
        json={"model": "tiny", "prompt": "x", "logit_bias": {}},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert bad.status_code == 400 and "unknown field(s): logit_bias" in bad.text
