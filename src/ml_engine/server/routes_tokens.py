"""Embeddings and tokens: ``POST /v1/embeddings`` (OpenAI's), ``POST /tokenize`` and
``POST /detokenize`` (llama-server's).

All three run in the model's worker process (``llm_worker_ops``), holding the model as a
generation does; embeddings also take a place in the generation queue (they decode the whole
input). ``/v1/embeddings`` errors have OpenAI's shape, ``/tokenize`` and ``/detokenize`` the
server's own ``{"error": ...}`` (as llama-server's routes outside ``/v1``).
"""

from __future__ import annotations

import base64
import struct
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from ml_engine.server.errors import ApiError
from ml_engine.server.generation_queue import run_until_gone
from ml_engine.server.guards import require_json
from ml_engine.server.llm_service import LlmKey, LlmService
from ml_engine.server.openai_extras import timings
from ml_engine.server.schemas import Name, StrictBody
from ml_engine.server.state import ServerState

router = APIRouter(tags=["tokens"])

MAX_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request


class EmbeddingRequest(StrictBody):
    model: Name = Field(description="a model of GET /v1/models")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, a token-id list or a list of token-id lists"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector's little-endian float32 bytes"
    )
    dimensions: int | None = Field(
        None, description="must equal the model's embedding width (nothing is truncated)"
    )
    user: str | None = Field(None, description="accepted and ignored")


class TokenizeRequest(StrictBody):
    content: str = Field(description="the text (limits.max_prompt_chars)")
    add_special: bool = Field(False, description="add the model's BOS as llama.cpp would")
    parse_special: bool = Field(
        False, description="read special-token text (<s>, <|im_end|>) as those tokens"
    )
    with_pieces: bool = Field(False, description="each token as {id, piece}")
    model: Name | None = Field(None, description="a model of GET /llm/models; default: its")


class DetokenizeRequest(StrictBody):
    tokens: list[int] = Field(description="token ids")
    model: Name | None = Field(None, description="a model of GET /llm/models; default: its")


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _call(service: LlmService, model: str, op: str, *args: Any) -> Any:
    """``op`` on the model's worker, the model held for the call (blocking: in a thread)."""
    key = LlmKey("llama_cpp", model, None, None, None)
    loaded = service.acquire(key)
    try:
        if op == "embed":
            return loaded.backend.embed(*args, service.request_options(loaded, key).get("n_ctx"))
        return getattr(loaded.backend, op)(*args)
    finally:
        service.release(loaded)


def _inputs(state: ServerState, given: Any) -> list[str | list[int]]:
    """The request's input as a list of texts or token lists; empty ones are refused."""
    if isinstance(given, str):
        items: list[Any] = [given]
    elif given and all(isinstance(item, int) for item in given):
        items = [given]  # one token list
    else:
        items = list(given)
    if not items:
        raise ApiError(400, "input is an empty list; give at least one text or token list")
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"input has {len(items)} items; at most {MAX_INPUTS}")
    allowed = state.settings.limits.max_prompt_chars
    for index, item in enumerate(items):
        where = "input" if isinstance(given, str) else f"input[{index}]"
        if len(item) == 0:
            raise ApiError(400, f"{where} is empty; give at least one character or token")
        if len(item) > allowed:
            raise ApiError(400, f"{where} has {len(item)} items; allowed: [1, {allowed}]")
    return items


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.post(
    "/v1/embeddings",
    summary="OpenAI embeddings: mean-pooled, unit-length vectors",
    dependencies=[Depends(require_json)],
    tags=["openai"],
)
async def create_embeddings(request: Request, body: EmbeddingRequest) -> dict[str, Any]:
    state = _state(request)
    state.generation.check_room()
    inputs = _inputs(state, body.input)
    if body.model not in state.llm.model_names():
        raise ApiError(
            404,
            f"the model '{body.model}' does not exist; see GET /v1/models",
            code="model_not_found",
        )
    slot = await state.generation.enter(request)
    try:
        done = await run_until_gone(
            request, partial(_call, state.llm, body.model, "embed", inputs), slot.cancellation
        )
    finally:
        slot.release()
    slot.cancellation.check()  # the client left, or the server is stopping
    width = int(done["n_embd"])
    if body.dimensions is not None and body.dimensions != width:
        raise ApiError(
            400,
            f"dimensions={body.dimensions} is not supported: the embeddings of '{body.model}' "
            f"have {width} dimensions (nothing is truncated); leave dimensions out",
            code="unsupported_value",
        )
    tokens = sum(done["tokens"])
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(done["embeddings"])
    ]
    prompt_ms = float(done["timings"]["prompt_eval_s"]) * 1000
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "timings": timings(tokens, prompt_ms, 0, 0.0),
    }


def _model(service: LlmService, model: str | None) -> str:
    if model is not None:
        service.check_model(model)
        return model
    default = service.default_model(service.describe_models())
    if default is None:
        raise ApiError(422, "no model can be loaded; name one with model (see GET /llm/models)")
    return default


@router.post(
    "/tokenize",
    summary="llama-server's /tokenize: a text's token ids (and pieces)",
    dependencies=[Depends(require_json)],
)
def tokenize(request: Request, body: TokenizeRequest) -> dict[str, Any]:
    state = _state(request)
    allowed = state.settings.limits.max_prompt_chars
    if len(body.content) > allowed:
        raise ApiError(422, f"content has {len(body.content)} characters; allowed: ≤ {allowed}")
    model = _model(state.llm, body.model)
    options = (body.content, body.add_special, body.parse_special, body.with_pieces)
    return {**_call(state.llm, model, "tokenize", *options), "model": model}


@router.post(
    "/detokenize",
    summary="llama-server's /detokenize: token ids back to text",
    dependencies=[Depends(require_json)],
)
def detokenize(request: Request, body: DetokenizeRequest) -> dict[str, Any]:
    state = _state(request)
    allowed = state.settings.limits.max_prompt_chars
    if len(body.tokens) > allowed:
        raise ApiError(422, f"tokens has {len(body.tokens)} ids; allowed: ≤ {allowed}")
    model = _model(state.llm, body.model)
    return {**_call(state.llm, model, "detokenize", body.tokens), "model": model}
