"""A chat with tools (OpenAI's ``tools``, assistant ``tool_calls``, ``role: tool`` replies) as
one prompt, in the model worker.

Where the GGUF's chat template takes ``tools`` (Qwen 2.5, Hermes, Llama 3.1…), it is rendered
by Jinja as llama-cpp-python's ``Jinja2ChatFormatter`` does, with the tools, the assistant's
calls (arguments as objects, as Hugging Face templates expect) and the tool results. Elsewhere
(no template, or one without tools: llama.cpp's ``llama_chat_apply_template`` knows only role and
text) the tools are described in a system message written here, calls become the assistant's
``<tool_call>`` text and results user turns in ``<tool_response>``: the Hermes convention, the
same format the grammar (``structured.tool_call_grammar``) makes the reply use.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

from ml_engine.llm.structured import TOOL_CLOSE, TOOL_OPEN

SYSTEM_TOOLS = (
    "You can call these tools. To call one, reply with only\n"
    f'{TOOL_OPEN}{{"name": <tool name>, "arguments": <arguments object>}}{TOOL_CLOSE}\n'
    "Tools (each with the JSON schema of its arguments):\n"
)


def call_text(call: dict[str, Any]) -> str:
    """An assistant's tool call as the text the model writes for it."""
    function = call["function"]
    arguments = _arguments(function.get("arguments"))
    body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_OPEN}{body}{TOOL_CLOSE}"


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}


def template_takes_tools(template: str) -> bool:
    """The Jinja template reads a ``tools`` variable."""
    import jinja2
    from jinja2 import meta

    try:
        parsed = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return False
    return "tools" in meta.find_undeclared_variables(parsed)


def _special_text(backend: Any, token: int) -> str:
    if token < 0:
        return ""
    buffer = ctypes.create_string_buffer(256)
    n = backend._lib.llama_token_to_piece(backend._vocab, token, buffer, 256, 0, True)
    return buffer.raw[: max(n, 0)].decode("utf-8", errors="replace")


def tool_chat_prompt(
    backend: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[str, str]:
    """The prompt (assistant turn opened) and how it was made (the X-Chat-Template header)."""
    backend._check_template()
    raw = backend._lib.llama_model_chat_template(backend._model, None)
    template = raw.decode("utf-8", errors="replace") if raw else ""
    if template and template_takes_tools(template):
        return _jinja_prompt(backend, template, messages, tools), "model (jinja, tools)"
    pairs = _plain_messages(messages, tools)
    text, used = backend.apply_chat_template(pairs)
    return text, f"{used}; tools in a system message"


def _jinja_prompt(
    backend: Any, template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = _special_text(backend, backend.bos)
    eos = _special_text(backend, int(backend._lib.llama_vocab_eos(backend._vocab)))
    shaped = []
    for message in messages:
        entry = {k: v for k, v in message.items() if v is not None}
        if message.get("tool_calls"):
            entry["tool_calls"] = [
                {
                    **call,
                    "function": {
                        **call["function"],
                        "arguments": _arguments(call["function"].get("arguments")),
                    },
                }
                for call in message["tool_calls"]
            ]
            entry.setdefault("content", "")
        shaped.append(entry)
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
    text = formatter(messages=shaped, tools=tools or None).prompt
    # llama.cpp's tokenizer adds BOS itself where the model wants one: not twice
    if bos and backend.add_bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def _plain_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(call_text(call) for call in message["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        pairs.append((role, content))
    if tools:
        described = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
        system = SYSTEM_TOOLS + described
        if pairs and pairs[0][0] == "system":
            pairs[0] = ("system", f"{pairs[0][1]}\n\n{system}")
        else:
            pairs.insert(0, ("system", system))
    return pairs
