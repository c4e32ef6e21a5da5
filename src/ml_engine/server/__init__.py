"""The engine's REST API and browser UI: ``create_app(cfg)`` builds the FastAPI app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ml_engine.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # imported on first use: ``python serve.py`` checks its settings (ml_engine.server.settings)
    # before the app's imports (FastAPI, torch, Lightning), so a bad value is refused at once
    if name == "create_app":
        from ml_engine.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
