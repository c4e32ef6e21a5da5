"""The engine's REST API and browser UI: ``create_app(cfg)`` builds the FastAPI app."""

from ml_engine.server.app import create_app

__all__ = ["create_app"]
