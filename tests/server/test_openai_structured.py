"""/v1 structured output and tool calls through the official ``openai`` client on a live server.

The tiny models have random weights: whatever they write is noise, so a reply that parses and
validates does so because the grammar made it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import Enum
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from ml_engine.server import create_app
from tests.server.conftest import live_server, serve_config

KEY = "sk-test"
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("structured")
    cfg = serve_config(tmp, **{"paths.models_dir": str(tmp / "models"), "api_key": KEY})
    with live_server(create_app(cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


class Kind(str, Enum):
    port = "port"
    capital = "capital"


class Place(BaseModel):
    name: str = Field(max_length=6)
    kind: Kind
    tags: list[Annotated[str, Field(max_length=4)]] = Field(max_length=2)


class City(BaseModel):
    place: Place
    code: str = Field(pattern=r"^[A-Z]{2}-\d{2}$")
    big: bool


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "owner": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 5},
                    "role": {"enum": ["admin", "user", None]},
                },
                "required": ["name", "role"],
            },
        },
        "required": ["id", "owner"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": 3},
        "minItems": 1,
        "maxItems": 3,
    },
    "pattern": {
        "type": "object",
        "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
            "word": {"type": "string", "pattern": "\\w{2,4}"},
            "any": {"type": "string", "pattern": "^a.{0,3}$"},
        },
        "required": ["zip", "word", "any"],
    },
    "refs": {
        "$defs": {"point": {"type": "array", "prefixItems": [{"type": "number"}] * 2}},
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/point"},
            "b": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}]},
            "when": {"type": "string", "format": "date"},
            "flag": {"type": "boolean"},
        },
        "required": ["a", "b", "when", "flag"],
    },
}


def _format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_replies_validate_on_both_routes(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    for seed in range(4):
        chat = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=200,
            seed=seed,
            response_format=_format(name),
        )
        choice = chat.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    text = client.completions.create(
        model="tiny",
        prompt="JSON:",
        max_tokens=200,
        seed=7,
        extra_body={"response_format": _format(name)},
    )
    assert text.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text.choices[0].text), schema)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    for seed in range(4):
        parsed = client.chat.completions.parse(
            model="tiny", messages=MESSAGES, max_tokens=200, seed=seed, response_format=City
        )
        city = parsed.choices[0].message.parsed
        assert isinstance(city, City) and isinstance(city.place.kind, Kind)
        City.model_validate_json(parsed.choices[0].message.content)


def test_streamed_json_object_and_a_cut_reply(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=300,
            seed=3,
            stream=True,
            response_format={"type": "json_object"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # never invalid JSON with "stop"
        assert finish == "length"
    # max_tokens before the grammar completes: "length", and parse() refuses the half object
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model="tiny", messages=MESSAGES, max_tokens=5, seed=1, response_format=City
        )


REFUSED = {
    "format": {"type": "string", "format": "email"},
    "minimum": {"type": "integer", "minimum": 3},
    "multipleOf": {"type": "number", "multipleOf": 2},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "patternProperties": {"type": "object", "patternProperties": {"^a": {}}},
    "not": {"not": {"type": "string"}},
    "if": {"if": {"type": "string"}, "then": {"maxLength": 2}},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object"}]},
    "$ref": {"$ref": "https://example.com/schema.json"},
    "minProperties": {"type": "object", "minProperties": 1},
    "\\D": {"type": "string", "pattern": "^\\D+$"},
    "[^": {"type": "string", "pattern": "^[^a]+$"},
    "(?": {"type": "string", "pattern": "^(?=a)a$"},
    "maxLength": {"type": "string", "pattern": "^a+$", "maxLength": 3},
}
MALFORMED = {
    "type": {"type": "strnig"},
    "required": {"type": "object", "properties": {}, "required": ["x"]},
    "maxLength": {"type": "string", "maxLength": -1},
    "pattern": {"type": "string", "pattern": "(unclosed"},
}


def test_unenforceable_and_malformed_schemas_are_400(client: openai.OpenAI) -> None:
    for keyword, schema in {**REFUSED, **MALFORMED}.items():
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=4, response_format=fmt
            )
        error = refused.value.body
        assert error["type"] == "invalid_request_error" and keyword in error["message"], error
        assert "\n" not in error["message"]
    with pytest.raises(openai.BadRequestError, match="stop cannot be combined"):
        client.completions.create(
            model="tiny",
            prompt="x",
            stop=["}"],
            extra_body={"response_format": {"type": "json_object"}},
        )
    assert client.models.list().data  # still serving


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMA_OF[call.function.name])
    return arguments


def test_tool_calls_required_named_and_a_follow_up_turn(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=2
    )
    assert raw.headers["x-chat-template"].endswith("tools in a system message")
    reply = raw.parse()
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    _check_call(call)
    for seed in range(3):
        named = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=200,
            seed=seed,
        )
        (timed,) = named.choices[0].message.tool_calls
        assert timed.function.name == "get_time" and named.choices[0].finish_reason == "tool_calls"
        _check_call(timed)
    follow = client.chat.completions.create(
        model="tiny",
        messages=[
            *MESSAGES,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,
        seed=1,
    )
    assert follow.choices[0].message.tool_calls is None
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_assemble_in_the_client(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=4
    )
    with client.chat.completions.stream(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, seed=4
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == whole.choices[0].message.tool_calls[0].function.name
    assert json.loads(call.function.arguments) == _check_call(
        whole.choices[0].message.tool_calls[0]
    )


def test_auto_answers_a_call_or_text(client: openai.OpenAI) -> None:
    for seed in range(6):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=60, seed=seed
        )
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_call(choice.message.tool_calls[0])
        else:
            assert not choice.message.content.startswith("<")
            assert choice.finish_reason in ("stop", "length")


def test_bad_tool_requests_are_400(client: openai.OpenAI, server: str) -> None:
    cases = {
        "not in tools": {
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        "needs tools": {"tool_choice": "required"},
        "minimum": {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"n": {"type": "integer", "minimum": 1}},
                        },
                    },
                }
            ]
        },
        "tools[1]": {
            "tools": [
                WEATHER,
                {"type": "function", "function": {"name": "g", "parameters": {"type": "strnig"}}},
            ]
        },
    }
    for expected, extra in cases.items():
        answer = httpx.post(
            f"{server}/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, **extra},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert answer.status_code == 400 and expected in answer.json()["error"]["message"], (
            answer.text
        )
    with pytest.raises(openai.BadRequestError, match="needs tool_call_id"):
        client.chat.completions.create(
            model="tiny", messages=[*MESSAGES, {"role": "tool", "content": "x"}], max_tokens=2
        )
