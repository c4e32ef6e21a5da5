"""``/v1``'s structured output (``response_format``) and tool calls (``tools``, ``tool_choice``).

Both are enforced while sampling: the request becomes a GBNF grammar (``llm/structured.py``)
that llama.cpp's grammar sampler applies to every token, so a reply that ends (``finish_reason``
``stop`` / ``tool_calls``) is valid JSON of the schema. A reply cut by ``max_tokens`` first ends
with ``length`` and the partial text, as OpenAI's own does: the official client's ``.parse()``
raises ``LengthFinishReasonError`` on it rather than returning half an object. A schema keyword
the grammar cannot enforce is a 400 naming it.

A tool call is written by the model as ``<tool_call>\\n{"name": …, "arguments": {…}}\\n
</tool_call>`` (the Hermes / Qwen convention) and answered as OpenAI's ``message.tool_calls``.
``tool_choice``: ``none`` (no grammar, tools still shown to the model), ``auto`` (a call or free
text that does not start with ``<``: decided by the reply's first character, so the reply is
wholly one or the other), ``required`` (one call of any tool), a named function (a call of it).
One call per reply.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml_engine.llm.structured import (
    TOOL_CLOSE,
    TOOL_OPEN,
    SchemaRefused,
    json_object_grammar,
    schema_grammar,
    tool_call_grammar,
)
from ml_engine.server.errors import ApiError
from ml_engine.server.schemas import StrictBody

_FORBID = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(BaseModel):
    model_config = _FORBID
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionSpec(BaseModel):
    model_config = _FORBID
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(StrictBody):
    name: str
    arguments: str


class ToolCall(StrictBody):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


def _refused(exc: SchemaRefused) -> ApiError:
    return ApiError(400, str(exc), code="unsupported_schema")


def response_grammar(body: Any) -> str | None:
    """The grammar of ``response_format`` (None: plain text)."""
    fmt: ResponseFormat | None = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if body.stop:
        raise ApiError(
            400,
            "stop cannot be combined with response_format: a stop string could "
            "cut the JSON; leave stop out",
        )
    if fmt.type == "json_object":
        return json_object_grammar()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(400, "response_format.json_schema.schema: give the JSON schema of the reply")
    try:
        return schema_grammar(fmt.json_schema.schema_)
    except SchemaRefused as exc:
        raise _refused(exc) from None


@dataclass
class ToolPlan:
    """What a chat request's tools make of the generation and of its reply."""

    grammar: str | None
    tools: list[dict[str, Any]] | None
    calls: bool  # the reply may be a call (tool_choice is not none)
    forced: bool  # the reply is a call (required or a named function)

    def message(self, text: str, finish: str) -> tuple[dict[str, Any], str]:
        """The assistant message and finish reason of a whole reply."""
        if not self.calls or not (self.forced or text.startswith("<")):
            return {"role": "assistant", "content": text, "refusal": None}, finish
        call, complete = parse_call(text)
        if call is None:  # cut before its name was written
            return {"role": "assistant", "content": text, "refusal": None}, finish
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        return message, "tool_calls" if complete and finish == "stop" else finish

    def chunks(self, events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """OpenAI's chat chunks with a call's text turned into ``delta.tool_calls``: held until
        the call is complete (or cut), then its id and name, then its arguments."""
        held: list[str] = []
        deciding = self.calls
        for event in events:
            choices = event.get("choices") or []
            if not choices or not deciding:
                yield event
                continue
            choice = choices[0]
            content = (choice.get("delta") or {}).get("content")
            finish = choice.get("finish_reason")
            if content:
                if not held and not self.forced and not content.startswith("<"):
                    deciding = False  # free text: streamed as it comes
                    yield event
                    continue
                held.append(content)
            if finish is None:
                if not content:
                    yield event  # the opening role chunk
                continue
            text = "".join(held)
            call, complete = parse_call(text) if held else (None, False)
            if call is None:
                if text:
                    yield _with(event, {"content": text}, None)
                yield event
                continue
            opening = {"index": 0, "id": call["id"], "type": "function"}
            yield _with(
                event,
                {
                    "tool_calls": [
                        {**opening, "function": {"name": call["function"]["name"], "arguments": ""}}
                    ]
                },
                None,
            )
            yield _with(
                event,
                {
                    "tool_calls": [
                        {"index": 0, "function": {"arguments": call["function"]["arguments"]}}
                    ]
                },
                None,
            )
            reason = "tool_calls" if complete and finish == "stop" else finish
            yield _with(event, {}, reason)


def _with(event: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice = {**event["choices"][0], "delta": delta, "finish_reason": finish}
    return {**event, "choices": [choice]}


def parse_call(text: str) -> tuple[dict[str, Any] | None, bool]:
    """The call in a reply's text, and whether it is complete (a cut one keeps its partial
    arguments, as OpenAI's replies cut by max_tokens do)."""
    body = text.removeprefix(TOOL_OPEN.strip()).strip()
    complete = body.endswith(TOOL_CLOSE.strip())
    body = body.removesuffix(TOOL_CLOSE.strip()).strip()
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    try:
        parsed = json.loads(body)
        name, arguments = parsed["name"], json.dumps(parsed["arguments"], ensure_ascii=False)
    except (ValueError, KeyError, TypeError):
        complete = False
        marker = body.find('"arguments"')
        start = body.find('"name"')
        if start < 0 or marker < 0:
            return None, False
        try:
            name = json.loads(body[body.index(":", start) + 1 : marker].strip().rstrip(",").strip())
        except ValueError:
            return None, False
        arguments = body[body.index(":", marker) + 1 :].strip()
    function = {"name": name, "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function}, complete


def plan_tools(body: Any, messages: list[dict[str, Any]]) -> ToolPlan:
    """Check ``tools``, ``tool_choice`` and the tool messages (a 400 naming what is wrong), add
    the calls and call ids to ``messages``, and build the grammar of the reply."""
    for index, message in enumerate(body.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise ApiError(400, f"messages[{index}]: a role 'tool' message needs tool_call_id")
        if message.tool_calls and message.role != "assistant":
            raise ApiError(400, f"messages[{index}]: only assistant messages carry tool_calls")
        if message.tool_calls:
            messages[index]["tool_calls"] = [c.model_dump() for c in message.tool_calls]
        if message.tool_call_id:
            messages[index]["tool_call_id"] = message.tool_call_id
    tools = body.tools or []
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: two tools have the same name")
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            known = ", ".join(names) or "none given"
            raise ApiError(
                400,
                f"tool_choice names the function '{choice.function.name}', which is not in "
                f"tools ({known})",
                param="tool_choice",
            )
    elif choice in ("auto", "required") and not tools and body.tool_choice is not None:
        raise ApiError(400, f"tool_choice '{choice}' needs tools")
    specs = [
        (tool.function.name, tool.function.parameters or {"type": "object", "properties": {}})
        for tool in tools
    ]
    grammar = None
    try:
        for index, spec in enumerate(specs):  # every tool's schema, whether chosen or not
            try:
                tool_call_grammar([spec], free_text=False)
            except SchemaRefused as exc:  # checked alone, it is tools[0] to the converter
                message = str(exc).replace("tools[0]", f"tools[{index}]", 1)
                raise SchemaRefused(message) from None
        if isinstance(choice, NamedToolChoice):
            grammar = tool_call_grammar(
                [s for s in specs if s[0] == choice.function.name], free_text=False
            )
        elif choice in ("auto", "required") and specs:
            grammar = tool_call_grammar(specs, free_text=choice == "auto")
    except SchemaRefused as exc:
        raise _refused(exc) from None
    format_type = body.response_format.type if body.response_format is not None else "text"
    if grammar is not None and format_type != "text":
        raise ApiError(400, "give response_format or tools with tool_choice != none, not both")
    if grammar is not None and body.stop:
        raise ApiError(
            400,
            "stop cannot be combined with tools: a stop string could cut a "
            "tool call; leave stop out",
        )
    dumped = [tool.model_dump(by_alias=True, exclude_none=True) for tool in tools] or None
    calls = grammar is not None
    forced = calls and choice != "auto"
    return ToolPlan(grammar, dumped, calls, forced)
