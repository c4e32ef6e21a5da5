"""Tool calls through a GGUF whose own Jinja chat template reads ``tools`` (Qwen 2.5's, as the
file carries it in ``tokenizer.chat_template``): the prompt is that template's rendering, not
the system-message fallback, and the official client gets a valid call and a follow-up turn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from ml_engine.server import create_app
from tests.server.conftest import live_server, serve_config

# Qwen 2.5 Instruct's template, as its GGUFs carry it: tools in the system turn, calls as
# <tool_call> JSON with the arguments as an object, results as <tool_response> in a user turn
QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (the template's own lines)

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
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]
MODEL = "Qwenish"


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ml_engine.llm.gguf_writer import (
        LlamaShape,
        byte_fallback_vocabulary,
        random_llama_tensors,
        write_llama_gguf,
    )

    shape = LlamaShape(
        n_vocab=512, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=2, n_ctx=1024
    )
    return write_llama_gguf(
        tmp_path_factory.mktemp("qwenish") / "qwenish.gguf",
        shape,
        byte_fallback_vocabulary(shape.n_vocab),
        random_llama_tensors(shape, seed=3),
        name=MODEL,
        chat_template=QWEN_TEMPLATE,
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, qwen_gguf: Path) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("serve")
    values = {"paths.models_dir": str(tmp / "models"), "llm.files": [str(qwen_gguf)]}
    with live_server(create_app(serve_config(tmp, **values))) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_the_prompt_is_the_files_template_with_tools_calls_and_results(qwen_gguf: Path) -> None:
    """What the model reads: the template's own tool block, the call's arguments as an object
    (a string would be JSON inside JSON) and the result in its <tool_response>."""
    from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
    from ml_engine.llm.chat_tools import tool_chat_prompt

    backend = LlamaCppBackend(qwen_gguf, n_ctx=512, n_threads=1, n_batch=128)
    try:
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
        }
        messages = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ]
        text, used = tool_chat_prompt(backend, messages, [WEATHER])
    finally:
        backend.close()
    assert used == "model (jinja, tools)"
    assert "# Tools" in text and json.dumps(WEATHER) in text  # the template's tool block
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1


def test_tool_calls_render_through_the_files_template(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, seed=1
    )
    assert raw.headers["x-chat-template"] == "model (jinja, tools)"
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    follow = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
        seed=1,
    )
    assert follow.headers["x-chat-template"] == "model (jinja, tools)"
    answer = follow.parse().choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert answer.message.content is not None
