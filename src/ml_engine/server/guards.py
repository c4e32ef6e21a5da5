"""Safety checks shared by the routes: bearer token, body size, value ranges."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ml_engine.server.errors import ApiError
from ml_engine.server.settings import Range


def bearer_guard(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency requiring ``Authorization: Bearer <api_key>`` when a key is configured.

    It guards the /ml and /llm routers; /health, the UI shell and the schema stay open: they
    hold no data and start nothing."""

    async def require_token(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong bearer token; send 'Authorization: Bearer <api_key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


def check_range(name: str, value: float | None, allowed: Range) -> None:
    """A 422 naming the field and its allowed range when ``value`` falls outside it."""
    if value is None:
        return
    if not allowed.low <= value <= allowed.high:
        raise ApiError(422, f"{name}={value!r} is out of range; allowed: {allowed.describe()}")


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` with a 413 before they are read into memory, whether
    or not the client declared a Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await self._refuse(send, 400, "Content-Length is not a number")
                return
            if too_big:
                await self._refuse(send, 413, self._message())
                return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._refuse(send, 413, self._message())

    def _message(self) -> str:
        return f"request body too large; allowed: at most {self.max_bytes} bytes"

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so that FastAPI's body parsing passes it through as a 413."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)
