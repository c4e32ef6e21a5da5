"""``/v1``: the OpenAI-compatible API beside ours, for the clients users already have.

``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true``: server-sent events in
OpenAI's chunk format, ending ``data: [DONE]``) and ``GET /v1/models``. Models are the GGUF files
``/llm/models`` lists (configured, ``llm.files``, exported), always through llama.cpp in a
worker. A chat is formatted with the model file's own chat template by llama.cpp's
``llama_chat_apply_template``; a file without one (or with one llama.cpp does not recognise) gets
llama.cpp's built-in "chatml", and the ``X-Chat-Template`` header says which was used.
Errors have OpenAI's shape (``errors.py``).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from ml_engine.errors import UserError
from ml_engine.server.errors import ApiError, openai_error
from ml_engine.server.generation_queue import Slot, run_until_gone
from ml_engine.server.guards import check_range, require_json
from ml_engine.server.llm_process import (
    ProcessStream,
    WorkerCrashed,
    WorkerFailed,
    WorkerTimedOut,
)
from ml_engine.server.llm_service import LlmKey, LlmService, _Loaded
from ml_engine.server.openai_extras import chat_logprobs, completion_logprobs, generation_timings
from ml_engine.server.schemas import Name, StrictBody
from ml_engine.server.state import ServerState
from ml_engine.server.streaming import relay_in_thread
from ml_engine.server.tool_calls import (
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
    plan_tools,
    response_grammar,
)

router = APIRouter(prefix="/v1", tags=["openai"])

TEMPLATE_HEADER = "X-Chat-Template"
MAX_STOPS = 4  # OpenAI's limit


class StreamOptions(StrictBody):
    include_usage: bool = False


class _Request(StrictBody):
    model: Name = Field(description="a model of GET /v1/models")
    max_tokens: int | None = Field(None, description="limits.max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: str | list[str] | None = Field(None, description="up to 4; not part of the text")
    n: int = Field(1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: enforced by a grammar while sampling"
    )


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls")
    tool_call_id: str | None = Field(None, description="the call a role 'tool' message answers")

    def text(self) -> str:
        if self.content is None:  # an assistant message that only calls tools
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="max_tokens' newer name")
    tools: list[Tool] | None = Field(None, description="functions the reply may call")
    tool_choice: ToolChoice | None = Field(None, description="none, auto, required or one")
    parallel_tool_calls: bool | None = Field(None, description="accepted; one call per reply")
    logprobs: bool = Field(False, description="each token's log-probability")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="and the k most likely tokens' (needs logprobs)"
    )


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(description="a string (or a list of one)")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="each token's log-probability and the k most likely's"
    )


def _state(request: Request) -> ServerState:
    return request.app.state.server


# ---- validation ------------------------------------------------------------------------------


def _sampling(state: ServerState, body: _Request, max_tokens: int | None, default: int) -> dict:
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported; only n=1", code="unsupported_value")
    tokens = default if max_tokens is None else max_tokens
    check_range("max_tokens", tokens, state.settings.limits.max_tokens)
    # OpenAI has no top_k or repetition penalty: both off, so its settings mean what they say
    return {
        "max_tokens": tokens,
        "temperature": body.temperature,
        "top_k": 0,
        "top_p": body.top_p,
        "repeat_penalty": 1.0,
        "seed": body.seed,
    }


def _stops(body: _Request) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop: give up to {MAX_STOPS} non-empty strings")
    return stops


def _check_prompt(state: ServerState, chars: int) -> None:
    allowed = state.settings.limits.max_prompt_chars
    if not 1 <= chars <= allowed:
        raise ApiError(400, f"the prompt has {chars} characters; allowed: [1, {allowed}]")


def _check_model(state: ServerState, model: str) -> None:
    if model not in state.llm.model_names():
        raise ApiError(
            404, f"the model '{model}' does not exist; see GET /v1/models", code="model_not_found"
        )


# ---- generation ------------------------------------------------------------------------------


class StopFilter:
    """Text up to the first stop string, the stop string excluded; a piece that may begin one
    is held back until the next piece decides."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        text = self.held + piece
        hits = [i for stop in self.stops if (i := text.find(stop)) >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = max((self._overlap(text, stop) for stop in self.stops), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Generation:
    """One generation in a worker, the model held until ``close`` (idempotent)."""

    def __init__(
        self, service: LlmService, loaded: _Loaded, stream: ProcessStream, stops: list[str]
    ) -> None:
        self._service, self._loaded, self._stream = service, loaded, stream
        self._filter = StopFilter(stops)
        self._closed = False
        self._lock = threading.Lock()
        self.template = str(stream.start.get("chat_template"))
        self.finish_reason = "length"
        self._logprobs_taken = 0

    def pieces(self) -> Iterator[str]:
        try:
            for piece in self._stream:
                text = self._filter.feed(piece)
                if text:
                    yield text
                if self._filter.stopped:
                    break
            if not self._filter.stopped and (tail := self._filter.flush()):
                yield tail
        finally:
            self.close()
        stats = self._stream.stats or {}
        stopped = self._filter.stopped or stats.get("finish_reason") == "stop"
        self.finish_reason = "stop" if stopped else "length"

    def usage(self) -> dict[str, int]:
        stats = self._stream.stats or {}
        prompt = int(self._stream.start.get("prompt_tokens") or 0)
        completion = int(stats.get("completion_tokens") or 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def take_logprobs(self) -> list[dict[str, Any]]:
        """The tokens' log-probability entries come in since the last call (streamed: those of
        the pieces read so far; ``[]`` when none were asked for)."""
        entries = self._stream.logprobs[self._logprobs_taken :]
        self._logprobs_taken += len(entries)
        return entries

    def logprobs_of(self, text: str) -> list[dict[str, Any]]:
        """Every entry of a whole generation whose token starts within ``text`` (a stop string
        cut the text: the tokens past it are not part of the answer)."""
        entries, at = [], 0
        for entry in self.take_logprobs():
            if self._filter.stopped and at >= len(text):
                break
            entries.append(entry)
            at += len(entry["token"])
        return entries

    def timings(self) -> dict[str, Any]:
        """llama-server's ``timings``: prompt and generation ms, ms per token, tokens/s."""
        usage = self.usage()
        worker = (self._stream.stats or {}).get("timings") or {}
        return generation_timings(usage["prompt_tokens"], usage["completion_tokens"], worker)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._stream.close()  # cancels the worker's generation between two tokens
        finally:
            self._service.release(self._loaded)
        self._count()

    def _count(self) -> None:
        """The tokens into /metrics, as /llm/generate counts its own."""
        stats = self._stream.stats or {}
        timings = stats.get("timings") or {}
        rate = timings.get("gen_tokens_per_s")
        tokens = int(stats.get("completion_tokens") or 0)
        self._service.metrics.generated("llama_cpp", tokens, rate)


def _open(
    state: ServerState, model: str, sampling: dict, stops: list[str], slot: Slot, **prompt
) -> Generation:
    """Take the model and start the generation (blocking: run in a thread); the slot's
    cancellation stops it between two tokens."""
    service = state.llm
    key = LlmKey("llama_cpp", model, None, None, None)
    loaded = service.acquire(key)
    try:
        slot.cancellation.check()
        text = prompt.pop("prompt", None)
        options = {**sampling, **service.request_options(loaded, key), **prompt}
        stream = loaded.backend.stream(text, **options)
    except BaseException:
        service.release(loaded)
        raise
    slot.cancellation.on_cancel(stream.cancel)
    return Generation(service, loaded, stream, stops)


def _whole(
    state: ServerState, model: str, sampling: dict, stops: list[str], slot: Slot, **prompt
) -> tuple[Generation, str]:
    """Open and read the whole generation in one thread call: a second call would need a free
    thread while this request holds the model."""
    generation = _open(state, model, sampling, stops, slot, **prompt)
    return generation, _collect(generation)


async def _generate(
    request: Request,
    state: ServerState,
    body: _Request,
    sampling: dict,
    stops: list[str],
    **prompt: Any,
) -> tuple[Generation, str | None, Slot | None]:
    """The generation (and its whole text when not streamed) once the request's turn has
    come; a stream keeps its slot, given back when the stream ends."""
    _check_model(state, body.model)
    slot = await state.generation.enter(request)
    work = _open if body.stream else _whole
    try:
        done = await run_until_gone(
            request,
            partial(work, state, body.model, sampling, stops, slot, **prompt),
            slot.cancellation,
        )
    except BaseException:
        slot.release()
        raise
    if body.stream:
        return done, None, slot
    slot.release()
    slot.cancellation.check()  # cut short: the client left, or the server is stopping
    return done[0], done[1], None


def _stream_error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, UserError):
        return openai_error(str(exc), 400)
    if isinstance(exc, WorkerTimedOut):
        return openai_error(str(exc), 504, "worker_timeout")
    if isinstance(exc, WorkerCrashed):
        return openai_error(str(exc), 502, "worker_crashed")
    if isinstance(exc, WorkerFailed):
        return openai_error(f"model worker failed: {exc}", 500)
    return openai_error(f"internal error: {type(exc).__name__}", 500)


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _relay(
    generation: Generation, events: Iterator[dict[str, Any]], slot: Slot
) -> AsyncIterator[bytes]:
    """The chunks as SSE, then ``[DONE]`` (or an error object); the worker's generation is
    cancelled when the stream ends, the client's leaving included, and the request's place in
    the generation queue given back."""
    chunks = itertools.chain((_sse(event) for event in events), [_sse("[DONE]")])

    def on_close() -> None:
        try:
            generation.close()
        finally:
            slot.release()

    return relay_in_thread(
        chunks,
        on_error=lambda exc: _sse(_stream_error(exc)),
        on_close=on_close,
        name="openai-stream",
        on_abandon=slot.cancellation.cancel,
    )


def _streaming(
    generation: Generation, events: Iterator[dict[str, Any]], slot: Slot
) -> StreamingResponse:
    return StreamingResponse(
        _relay(generation, events, slot),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            TEMPLATE_HEADER: generation.template,
        },
    )


def _answer(generation: Generation, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={TEMPLATE_HEADER: generation.template})


def _collect(generation: Generation) -> str:
    return "".join(generation.pieces())


def _chunks(
    generation: Generation, head: dict[str, Any], choice: Any, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """OpenAI's chunks: ``choice(text, finish_reason)`` per piece, then the finish reason,
    then (``include_usage``) a chunk without choices holding the usage."""
    usage: dict[str, Any] = {"usage": None} if include_usage else {}
    first = choice(None, None)
    if first is not None:
        yield {**head, "choices": [first], **usage}
    for text in generation.pieces():
        yield {**head, "choices": [choice(text, None)], **usage}
    # the last chunk carries the usage and llama-server's timings (the usage chunk when
    # include_usage asks for one, else the finish chunk: extra fields the client keeps)
    last = {"usage": generation.usage(), "timings": generation.timings()}
    finish = {**head, "choices": [choice("", generation.finish_reason)], **usage}
    yield finish if include_usage else {**finish, **last}
    if include_usage:
        yield {**head, "choices": [], **last}


# ---- routes ----------------------------------------------------------------------------------


@router.post(
    "/chat/completions",
    summary="OpenAI chat completion (stream: server-sent events)",
    dependencies=[Depends(require_json)],
)
async def chat_completions(request: Request, body: ChatRequest) -> Any:
    state = _state(request)
    state.generation.check_room()
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    for message in messages:  # llama.cpp's templates know "system", not OpenAI's newer name
        message["role"] = "system" if message["role"] == "developer" else message["role"]
    _check_prompt(state, sum(len(m["content"]) for m in messages))
    plan = plan_tools(body, messages)  # tools, tool_choice and tool messages (tool_calls.py)
    grammar = plan.grammar or response_grammar(body)
    tool_chat = bool(body.tools) or any(m.role == "tool" or m.tool_calls for m in body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    sampling = _sampling(state, body, max_tokens, default=256)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true")
    top = (body.top_logprobs or 0) if body.logprobs else None
    generation, text, slot = await _generate(
        request,
        state,
        body,
        sampling,
        _stops(body),
        mode="chat",
        messages=messages,
        top_logprobs=top,
        grammar=grammar,
        tools=plan.tools,
        tool_chat=tool_chat,
    )
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }
    if body.stream:

        def choice(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if text is None else {}
            if text:
                delta = {"content": text}
            logprobs = None
            if top is not None and text is not None:  # the tokens read since the last chunk
                logprobs = chat_logprobs(generation.take_logprobs())
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        include = bool(body.stream_options and body.stream_options.include_usage)
        events = _chunks(generation, {**head, "object": "chat.completion.chunk"}, choice, include)
        return _streaming(generation, plan.chunks(events), slot)
    message, finish_reason = plan.message(text or "", generation.finish_reason)
    return _answer(
        generation,
        {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None
                    if top is None
                    else chat_logprobs(generation.logprobs_of(text or "")),
                    "finish_reason": finish_reason,
                }
            ],
            "usage": generation.usage(),
            "timings": generation.timings(),
        },
    )


@router.post(
    "/completions",
    summary="OpenAI text completion (stream: server-sent events)",
    dependencies=[Depends(require_json)],
)
async def completions(request: Request, body: CompletionRequest) -> Any:
    state = _state(request)
    state.generation.check_room()
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, f"prompt: give one string (got a list of {len(prompts)})")
    _check_prompt(state, len(prompts[0]))
    sampling = _sampling(state, body, body.max_tokens, default=16)
    generation, text, slot = await _generate(
        request,
        state,
        body,
        sampling,
        _stops(body),
        mode="raw",
        prompt=prompts[0],
        top_logprobs=body.logprobs,
        grammar=response_grammar(body),
    )
    head = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }
    if body.stream:
        offset = [0]  # characters of the completion streamed so far: text_offset's origin

        def choice(text: str | None, finish: str | None) -> dict[str, Any] | None:
            if text is None:  # completions have no opening role chunk
                return None
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(generation.take_logprobs(), offset[0])
                offset[0] += len(text)
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _streaming(generation, _chunks(generation, head, choice, include), slot)
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(generation.logprobs_of(text or ""))
    choice = {
        "index": 0,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": generation.finish_reason,
    }
    reply = {**head, "choices": [choice], "usage": generation.usage()}
    return _answer(generation, {**reply, "timings": generation.timings()})


@router.get("/models", summary="OpenAI model list: every usable GGUF")
def list_models(request: Request) -> dict[str, Any]:
    service = _state(request).llm
    files = service.file_models()
    exported = service.exported_models()
    data = []
    # extra fields (the client keeps them): loaded now, and memory_fit's estimate once known
    state = service.loaded_state()
    for name in service.usable_models():
        path = files.get(name)
        owner = "ml-engine" if path is None else ("export" if name in exported else "llm.files")
        created = int(path.stat().st_mtime) if path is not None and path.exists() else 0
        loaded = state.get(name, {})
        data.append(
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": owner,
                "loaded": bool(loaded.get("loaded")),
                "memory_estimate_bytes": loaded.get("memory_estimate_bytes"),
            }
        )
    return {"object": "list", "data": data}
