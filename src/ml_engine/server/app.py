"""The FastAPI app: routers, error handlers, auth, body limit, the static UI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from omegaconf import DictConfig

from ml_engine import __version__
from ml_engine.server import routes_llm, routes_ml, routes_openai
from ml_engine.server.errors import install_error_handlers
from ml_engine.server.guards import BodySizeLimit, bearer_guard
from ml_engine.server.schemas import Health
from ml_engine.server.settings import Settings, load_settings
from ml_engine.server.state import ServerState

STATIC_DIR = Path(__file__).parent / "static"
SERVICE_NAME = "ml-engine"


def create_app(cfg: DictConfig | Settings) -> FastAPI:
    """Build the app from the composed ``serve`` config (or ready settings).

    Job runner threads start with the app's lifespan, so tests can build several apps and
    start each with ``TestClient(app)`` or uvicorn.
    """
    settings = cfg if isinstance(cfg, Settings) else load_settings(cfg)
    state = ServerState.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="ml-engine",
        version=__version__,
        description="Train MNIST classifiers, predict digits, generate text with llama.cpp.",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)

    # HTTPBearer documents the scheme in /docs; bearer_guard does the checking and the 401
    protected = [Depends(HTTPBearer(auto_error=False)), Depends(bearer_guard(settings.api_key))]
    app.include_router(routes_ml.router, dependencies=protected)
    app.include_router(routes_llm.router, dependencies=protected)
    app.include_router(routes_openai.router, dependencies=protected)

    @app.get("/health", response_model=Health, tags=["service"], summary="Liveness")
    def health() -> dict[str, str]:
        return {"service": SERVICE_NAME, "status": "ok"}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
