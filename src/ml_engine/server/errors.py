"""Every failure a request can cause becomes a 4xx JSON body ``{"error": one line, ...}``.

A model worker that dies (llama.cpp aborting on a corrupt file) is a 502: the server is fine,
the process it relies on for that model failed. A write refused for want of disk space is a
507 naming the folder (``StorageFull``): the same request succeeds once space is freed. Under
``/v1`` (the OpenAI-compatible API) the body is OpenAI's ``{"error": {"message", "type",
"code"}}`` and a malformed request is a 400.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.run.helpers import first_line
from ml_engine.server.llm_process import WorkerCrashed, WorkerFailed, WorkerTimedOut

log = logging.getLogger(__name__)


class SafeJSONResponse(JSONResponse):
    """JSON that any Python string can be rendered into: a lone surrogate a client sent
    (``"\\ud800"``, echoed in an error) becomes its JSON escape instead of a 500."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        # backslashreplace writes a surrogate as \uXXXX: the very JSON escape it came in as
        return text.encode("utf-8", errors="backslashreplace")


class ApiError(Exception):
    """An error with its HTTP status, raised by services and turned into JSON here."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.extra, self.headers = status, message, extra, headers


class StorageFull(Exception):
    """A write refused because the filesystem holding ``folder`` is full: nothing was kept
    half-written, and the same request succeeds once space there is freed."""

    def __init__(self, folder: Path | str, what: str) -> None:
        super().__init__(f"no space left in {folder} ({what}); free some space there and retry")
        self.folder, self.what = Path(folder), what


# ENOSPC: the filesystem is full; EDQUOT: this user's quota on it is
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of disk space (an OSError, or SQLite's
    SQLITE_FULL, which sqlite3 raises as a plain OperationalError)."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE_ERRNOS
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == (
        sqlite3.SQLITE_FULL
    )


class NotFound(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(404, message)


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, **extra}


OPENAI_PREFIX = "/v1/"


def openai_error(message: str, status: int, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, which its clients turn into their exceptions."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 401:
        kind, code = "authentication_error", code or "invalid_api_key"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _answer(
    request: Request,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
    **extra: Any,
) -> JSONResponse:
    if request.url.path.startswith(OPENAI_PREFIX):
        status = 400 if status == 422 else status  # OpenAI's status for a bad request
        return SafeJSONResponse(openai_error(message, status, code), status, headers=headers)
    return SafeJSONResponse(error_body(message, **extra), status_code=status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """Pydantic's error list → one line: which fields are wrong and what is accepted."""
    messages = []
    for error in errors:
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        where = _location(tuple(error.get("loc", ())))
        if error.get("type") == "missing":
            messages.append(f"missing field '{where}'")
        elif message.startswith("unknown field") or (
            where == "body" and error.get("type") == "value_error"
        ):  # schemas.StrictBody's own checks of the whole body name the field themselves
            messages.append(message)
        elif error.get("type") == "json_invalid":
            messages.append(
                f"body is not valid JSON ({error.get('ctx', {}).get('error', message)})"
            )
        else:
            messages.append(f"{where}: {message}")
    return "; ".join(dict.fromkeys(messages)) or "invalid request"


def _json_safe(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic errors may carry the offending input (bytes, exceptions): keep what JSON holds."""
    safe = []
    for error in errors[:20]:
        safe.append(
            {
                "loc": [str(p) for p in error.get("loc", ())],
                "type": str(error.get("type", "")),
                "msg": str(error.get("msg", "")),
            }
        )
    return safe


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message = describe_validation(errors)
        return _answer(request, 422, message, detail=_json_safe(errors))

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        extra = dict(exc.extra)
        code = extra.pop("code", None)
        return _answer(request, exc.status, exc.message, exc.headers, code, **extra)

    @app.exception_handler(UnknownNameError)
    async def on_unknown_name(request: Request, exc: UnknownNameError) -> JSONResponse:
        return _answer(request, 422, str(exc), accepted=exc.accepted)

    @app.exception_handler(UserError)
    async def on_user_error(request: Request, exc: UserError) -> JSONResponse:
        return _answer(request, 422, str(exc))

    @app.exception_handler(WorkerCrashed)
    async def on_worker_crash(request: Request, exc: WorkerCrashed) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        if isinstance(exc, WorkerTimedOut):
            return _answer(request, 504, str(exc), code="worker_timeout")
        return _answer(request, 502, str(exc), code="worker_crashed")

    @app.exception_handler(WorkerFailed)
    async def on_worker_failure(request: Request, exc: WorkerFailed) -> JSONResponse:
        log.error("%s %s: model worker error: %s", request.method, request.url.path, exc)
        return _answer(request, 500, f"model worker failed: {first_line(exc)}")

    @app.exception_handler(StorageFull)
    async def on_storage_full(request: Request, exc: StorageFull) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _answer(request, 507, str(exc), code="storage_full", folder=str(exc.folder))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _answer(request, exc.status_code, message, exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not a user error: logged in full, answered without internals
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _answer(request, 500, f"internal error: {type(exc).__name__}")
