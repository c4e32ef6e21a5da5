"""Safety checks shared by the routes: bearer token, Host/Origin, JSON content type, body
size, value ranges."""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

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


async def require_json(request: Request) -> None:
    """A dependency of the JSON routes: only ``application/json`` bodies.

    A browser sends ``text/plain`` (or form) bodies cross-origin without asking the server
    first (a CORS "simple" request): a page on any site could queue trainings through them."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(
            415,
            f"content type '{content_type[:64] or 'none'}' is not accepted here; "
            "send a JSON body with 'Content-Type: application/json'",
        )


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_ANY_ADDRESS = ("0.0.0.0", "::", "")


def default_host_names(bound: str) -> set[str]:
    """The names a client may call this server by when it listens on ``bound``."""
    bound = bound.lower().strip("[]")
    if bound in LOOPBACK_NAMES or bound.startswith("127."):
        return {*LOOPBACK_NAMES, configured_host_name(bound) or bound}
    if bound in _ANY_ADDRESS:  # every interface: loopback and this machine's own names
        return {*LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()}
    return {configured_host_name(bound) or bound}


# RFC 9110's Host: uri-host [":" port], where uri-host is an IPv6 literal in brackets or a
# name (an IPv4 address is one too). Anything else is refused whole: a lenient split let
# "[::1].evil.example" and "[::1]evil" pass as ::1.
_HOST_HEADER = re.compile(
    r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_-]+(?:\.[a-z0-9_-]+)*))(?::(?P<port>\d{1,5}))?"
)


def parse_host(host: str) -> str | None:
    """A ``Host`` header's name without the port (``[::1]:80`` → ``::1``), lower case and IPv6
    in its short form; None when the header is not a well-formed ``host[:port]``."""
    match = _HOST_HEADER.fullmatch(host.strip().lower())
    if match is None:
        return None
    if match["name"] is not None:
        return match["name"]
    try:
        return ipaddress.IPv6Address(match["ipv6"]).compressed
    except ValueError:
        return None


def configured_host_name(entry: str) -> str | None:
    """A name from the config (``box.lan``, ``box.lan:8080``, ``[fe80::1]``, ``fe80::1``) as
    :func:`parse_host` gives it for a Host header naming it; None when it is no host name."""
    return parse_host(entry) or parse_host(f"[{entry.strip()}]")


class HostOriginGuard:
    """Without an api_key, serve only requests addressed to this server by one of its own
    names (``Host``) and, when a browser says where the request comes from (``Origin``), only
    from a page of this server.

    The Host check stops DNS rebinding (a site that points its own name at 127.0.0.1 would
    otherwise read and drive the API from the victim's browser); the Origin check stops any
    other page from sending requests the browser lets through without a preflight. With a
    key set neither is needed: browsers never add the bearer token by themselves."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        bound_host: str,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self.app, self.active = app, api_key is None
        extra = {h.lower() for h in allowed_hosts}
        self.any_host = "*" in extra
        configured = {configured_host_name(h) or h for h in extra}  # settings checked them
        self.host_names = default_host_names(bound_host) | configured
        self.origins = {o.lower().rstrip("/") for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.active:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(headers.get("host", ""), headers.get("origin"))
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await BodySizeLimit._refuse(send, *refusal)

    def _refusal(self, host: str, origin: str | None) -> tuple[int, str] | None:
        if not self.any_host and parse_host(host) not in self.host_names:
            return 421, (
                f"Host '{host[:100]}' is not a name of this server; call it by "
                f"{', '.join(sorted(self.host_names))} (or add the name to allowed_hosts)"
            )
        if origin is None:
            return None  # not sent by a browser page (curl, scripts)
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins:
            return None
        parts = urlsplit(origin)
        same_origin = parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()
        if same_origin:
            return None
        return 403, (
            f"requests from pages of origin '{origin[:100]}' are refused; use this server's "
            "own UI, add the origin to allowed_origins, or set api_key"
        )


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
