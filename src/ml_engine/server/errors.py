"""Every failure a request can cause becomes a 4xx JSON body ``{"error": one line, ...}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml_engine.errors import UnknownNameError, UserError

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


class NotFound(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(404, message)


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, **extra}


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
        return SafeJSONResponse(
            error_body(describe_validation(errors), detail=_json_safe(errors)), status_code=422
        )

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return SafeJSONResponse(
            error_body(exc.message, **exc.extra), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(UnknownNameError)
    async def on_unknown_name(request: Request, exc: UnknownNameError) -> JSONResponse:
        body = error_body(str(exc), accepted=exc.accepted)
        return SafeJSONResponse(body, status_code=422)

    @app.exception_handler(UserError)
    async def on_user_error(request: Request, exc: UserError) -> JSONResponse:
        return SafeJSONResponse(error_body(str(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return SafeJSONResponse(
            error_body(message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not a user error: logged in full, answered without internals
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return SafeJSONResponse(
            error_body(f"internal error: {type(exc).__name__}"), status_code=500
        )
