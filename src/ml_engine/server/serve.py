"""The ``serve`` task run by ``python serve.py``: uvicorn on the configured host and port."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

from omegaconf import DictConfig

from ml_engine.errors import UserError
from ml_engine.server.settings import load_settings, uvicorn_options

log = logging.getLogger(__name__)


def _check_bindable(host: str, port: int) -> None:
    """Fail with one line before uvicorn, whose bind errors are multi-line log output."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"host={host!r} cannot be resolved: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another with port=<n>"
            ) from None


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, which on SIGTERM or Ctrl-C first has the app end what it has in
        flight (waiting generations refused, running ones cancelled between two tokens) before
        uvicorn waits for the open connections: a stream would otherwise keep the server, and
        its jobs-database lock, until its last token."""

        async def shutdown(self, sockets: Any = None) -> None:
            state = getattr(self.config.app.state, "server", None)
            if state is not None:
                state.begin_shutdown()
            await super().shutdown(sockets)

    return GracefulServer


def serve(cfg: DictConfig) -> dict[str, Any]:
    # a bad value or a taken port is refused before the app's imports (FastAPI, torch,
    # Lightning: seconds), so a mistake ends at once
    settings = load_settings(cfg)
    _check_bindable(settings.host, settings.port)
    import uvicorn

    from ml_engine.server.app import create_app

    app = create_app(settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning(
            "listening on %s without api_key: anyone who can reach it can train", settings.host
        )
    print(f"serving on http://{settings.host}:{settings.port} (docs at /docs)", flush=True)
    server = _graceful_server_class()(uvicorn.Config(app, **uvicorn_options(settings)))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a user stops it
        server.run()
    return {"host": settings.host, "port": settings.port}
