"""/v1/embeddings, /tokenize, /detokenize, logprobs and timings, on a live server through the
official ``openai`` client (raw HTTP where the client has no method: /tokenize, base64 bytes)."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_engine.server import create_app
from tests.server.conftest import live_server, serve_config

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMINGS = {
    "prompt_n",
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tokens")
    cfg = serve_config(tmp, **{"paths.models_dir": str(tmp / "models"), "api_key": KEY})
    with live_server(create_app(cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, headers=AUTH, timeout=60)


def test_embeddings_vectors(client: openai.OpenAI, server: str) -> None:
    texts = ["Hello world", "something else entirely", "Hello world"]
    # the client asks for base64 by default and decodes it
    batch = client.embeddings.create(model="tiny", input=texts)
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in batch.data])
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert np.array_equal(vectors, np.array([d.embedding for d in floats.data]))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[2])  # same text, same vector
    assert not np.allclose(vectors[0], vectors[1])
    for text, vector in zip(texts, vectors, strict=True):  # a batch is its singles
        single = client.embeddings.create(model="tiny", input=text, encoding_format="float")
        assert np.allclose(single.data[0].embedding, vector, atol=1e-6)
    # usage: the tokens of the inputs, BOS included (as /tokenize with add_special counts)
    counts = [
        len(_post(server, "/tokenize", {"content": t, "add_special": True}).json()["tokens"])
        for t in texts
    ]
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == sum(counts)
    assert set(batch.model_extra["timings"]) == TIMINGS
    # base64 on the wire: little-endian float32 bytes of the float reply
    raw = _post(
        server, "/v1/embeddings", {"model": "tiny", "input": texts[0], "encoding_format": "base64"}
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert list(decoded) == floats.data[0].embedding
    # token ids in: the same vector as the text they came from
    ids = _post(server, "/tokenize", {"content": texts[1], "add_special": True}).json()["tokens"]
    by_ids = client.embeddings.create(model="tiny", input=[ids, ids], encoding_format="float")
    assert np.allclose(by_ids.data[1].embedding, vectors[1], atol=1e-6)
    assert client.embeddings.create(model="tiny", input=ids).usage.prompt_tokens == len(ids)


def test_embeddings_refusals(client: openai.OpenAI) -> None:
    cases = [
        ({"input": []}, "input is an empty list"),
        ({"input": ""}, "input is empty"),
        ({"input": ["a", ""]}, "input[1] is empty"),
        ({"input": "x", "dimensions": 64}, "dimensions=64 is not supported"),
        ({"input": [[300] * 2100]}, "has 2100 tokens but the context holds 2048"),
        ({"input": [[-1, 5]]}, "token id -1 is not in the vocabulary"),
    ]
    for fields, message in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.embeddings.create(model="tiny", **fields)
        assert message in raised.value.message and "\n" not in raised.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    assert client.embeddings.create(model="tiny", input="still serving").data


def test_tokenize_special_and_pieces(server: str) -> None:
    plain = _post(server, "/tokenize", {"content": "<s>x"}).json()
    special = _post(server, "/tokenize", {"content": "<s>x", "parse_special": True}).json()
    bos = _post(server, "/tokenize", {"content": "x", "add_special": True}).json()["tokens"][0]
    assert bos not in plain["tokens"] and special["tokens"][0] == bos
    assert plain["model"] == "tiny"  # the default model
    for reply in (plain, special):
        back = _post(server, "/detokenize", {"tokens": reply["tokens"]}).json()
        assert back["content"] == "<s>x"
    pieces = _post(server, "/tokenize", {"content": "hé", "with_pieces": True}).json()["tokens"]
    assert all(set(p) == {"id", "piece"} for p in pieces)
    bad = _post(server, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 422 and "not in the vocabulary" in bad.json()["error"]
    unknown = _post(server, "/tokenize", {"content": "x", "model": "nope"})
    assert unknown.status_code == 422


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(
        st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=40
    )
)
def test_tokenize_round_trip(server: str, text: str) -> None:
    tokens = _post(server, "/tokenize", {"content": text}).json()["tokens"]
    assert _post(server, "/detokenize", {"tokens": tokens}).json()["content"] == text


def _check_entry(entry: dict | object, k: int) -> None:
    get = entry.get if isinstance(entry, dict) else lambda name: getattr(entry, name)
    top = get("top_logprobs")
    assert len(top) == k
    values = [t["logprob"] if isinstance(t, dict) else t.logprob for t in top]
    assert values == sorted(values, reverse=True) and get("logprob") <= 0
    assert sum(math.exp(v) for v in values) <= 1 + 1e-6
    # greedy: the chosen token is the most likely one, its logprob the maximum
    assert math.isclose(get("logprob"), values[0], abs_tol=1e-9)
    first = top[0]["token"] if isinstance(top[0], dict) else top[0].token
    assert get("token") == first


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    options = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**options, logprobs=True, top_logprobs=5)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        _check_entry(entry, 5)
        assert entry.bytes == list(entry.token.encode()) or "\ufffd" in entry.token
    assert set(whole.model_extra["timings"]) == TIMINGS
    assert whole.model_extra["timings"]["predicted_n"] == whole.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(**options, logprobs=True, top_logprobs=5, stream=True)
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert np.allclose([e.logprob for e in streamed], [e.logprob for e in content])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert set(chunks[-1].model_extra["timings"]) == TIMINGS
    plain = client.chat.completions.create(**options)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**options, top_logprobs=2)


def test_completion_logprobs_legacy_shape(client: openai.OpenAI, server: str) -> None:
    options = {"model": "tiny", "prompt": "Once", "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(**options, logprobs=3)
    logprobs = whole.choices[0].logprobs
    n = whole.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) <= 3 and math.isclose(value, max(top.values()), abs_tol=1e-9)
        assert top[token] == value
    streamed = list(client.completions.create(**options, logprobs=3, stream=True))
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == logprobs.tokens
    assert set(streamed[-1].model_extra["timings"]) == TIMINGS
    assert streamed[-1].usage.completion_tokens == n
