"""``/llm``: configured models and text generation, whole or streamed as server-sent events."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ml_engine.errors import UserError
from ml_engine.llm.backends import BACKENDS
from ml_engine.run.helpers import first_line
from ml_engine.server.errors import ApiError
from ml_engine.server.generation_queue import Slot, run_until_gone
from ml_engine.server.guards import check_range, require_json
from ml_engine.server.llm_process import WorkerCrashed, WorkerFailed
from ml_engine.server.llm_service import SAMPLING_FIELDS, LlmKey
from ml_engine.server.schemas import GenerateRequest, GenerateResponse, LlmModelList
from ml_engine.server.state import ServerState
from ml_engine.server.streaming import relay_in_thread

log = logging.getLogger(__name__)

router = APIRouter(prefix="/llm", tags=["llm"])

STREAM_DOC = {
    "responses": {
        200: {
            "description": "JSON, or with `stream: true` server-sent events: `token` events "
            '(`{"token": ...}`), then one `done` event with the whole output and timings, '
            "or an `error` event.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }
}


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/models", response_model=LlmModelList, summary="Configured models, files on disk")
def list_models(request: Request) -> dict[str, Any]:
    llm = _state(request).llm
    models = llm.describe_models()
    default = llm.default_model(models)
    return {"backends": list(BACKENDS), "models": models, "default_model": default}


def _validate(state: ServerState, body: GenerateRequest) -> None:
    limits = state.settings.limits
    if not body.prompt:
        raise ApiError(422, "prompt is empty; give at least one character")
    if len(body.prompt) > limits.max_prompt_chars:
        raise ApiError(
            422,
            f"prompt has {len(body.prompt)} characters; allowed: [1, {limits.max_prompt_chars}]",
        )
    check_range("max_tokens", body.max_tokens, limits.max_tokens)
    check_range("n_ctx", body.n_ctx, limits.n_ctx)
    check_range("n_gpu_layers", body.n_gpu_layers, limits.n_gpu_layers)
    state.llm.check_model(body.model)


def _params(body: GenerateRequest) -> dict[str, Any]:
    fields = (*SAMPLING_FIELDS, "n_ctx", "n_gpu_layers")
    return {name: getattr(body, name) for name in fields}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _generation_error(exc: Exception) -> str:
    if isinstance(exc, (UserError, ValueError, WorkerCrashed)):
        return first_line(exc) or type(exc).__name__
    if isinstance(exc, WorkerFailed):
        return f"model worker failed: {first_line(exc)}"
    return f"generation failed: {type(exc).__name__}"


def _relay(
    first: dict[str, Any], events: Iterator[dict[str, Any]], extra: dict[str, Any], slot: Slot
) -> AsyncIterator[bytes]:
    """The token events as SSE (``token``…, then ``done`` with ``extra``, or ``error``); the
    iterator holds the model's lock and is closed when the stream ends, the request's place in
    the generation queue then given back."""

    def chunks() -> Iterator[bytes]:
        for event in itertools.chain([first], events):
            yield _sse("done", {**event, **extra}) if event.get("done") else _sse("token", event)

    def on_error(exc: Exception) -> bytes:
        if isinstance(exc, WorkerCrashed):
            log.error("streamed generation: %s", exc)
        elif not isinstance(exc, (UserError, ValueError)):
            log.exception("streamed generation failed")
        return _sse("error", {"error": _generation_error(exc)})

    def on_close() -> None:
        try:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        finally:
            slot.release()

    return relay_in_thread(
        chunks(),
        on_error=on_error,
        on_close=on_close,
        name="llm-stream",
        on_abandon=slot.cancellation.cancel,
    )


def _first_event(events: Iterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return next(events)
    except (UserError, ValueError) as exc:
        raise ApiError(422, _generation_error(exc)) from None
    except StopIteration:  # cannot happen: a stream always ends with its "done" event
        raise ApiError(422, "the model produced nothing") from None


def _open_stream(
    state: ServerState, key: LlmKey, prompt: str, sampling: dict[str, Any], slot: Slot
) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """Take the model, start the stream and read its first event, in one thread call: a second
    call would need a free thread while this request holds the model."""
    loaded = state.llm.acquire(key)
    try:
        slot.cancellation.check()
    except ApiError:
        state.llm.release(loaded)
        raise
    events = state.llm.stream_loaded(loaded, prompt, sampling, key, slot.cancellation)
    try:
        return _first_event(events), events
    except BaseException:
        events.close()
        raise


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate text",
    openapi_extra=STREAM_DOC,
    dependencies=[Depends(require_json)],
)
async def generate(request: Request, body: GenerateRequest) -> Any:
    state = _state(request)
    if body.backend != "mock":
        state.generation.check_room()
    _validate(state, body)
    key = LlmKey(body.backend, body.model, body.quantization, body.n_ctx, body.n_gpu_layers)
    sampling = {name: getattr(body, name) for name in SAMPLING_FIELDS}
    extra = {"model": body.model, "prompt": body.prompt, "params": _params(body)}
    result = None if body.stream else state.llm.complete_now(key, body.prompt, sampling)
    if result is None:  # a model worker, or the first request: its turn, then a thread
        slot = await state.generation.enter(request)
        if body.stream:
            return await _stream(request, state, key, body.prompt, sampling, extra, slot)
        try:
            work = partial(state.llm.complete, key, body.prompt, sampling, slot.cancellation)
            result = await run_until_gone(request, work, slot.cancellation)
            slot.cancellation.check()  # cut short: the client left, or the server is stopping
        except (UserError, ApiError):
            raise
        except ValueError as exc:  # llama.cpp: prompt longer than the context, and the like
            raise ApiError(422, _generation_error(exc)) from None
        finally:
            slot.release()
    output = result.pop("text")
    return {**extra, **result, "output": output}


async def _stream(
    request: Request,
    state: ServerState,
    key: LlmKey,
    prompt: str,
    sampling: dict[str, Any],
    extra: dict[str, Any],
    slot: Slot,
) -> StreamingResponse:
    # load (and report load errors as plain 4xx JSON) before the stream starts; the first
    # event is taken before answering, so that a prompt the model cannot take (longer than its
    # context, say) is a plain 422 rather than an error event after a 200
    try:
        work = partial(_open_stream, state, key, prompt, sampling, slot)
        first, events = await run_until_gone(request, work, slot.cancellation)
    except BaseException:
        slot.release()
        raise
    return StreamingResponse(
        _relay(first, events, extra, slot),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
