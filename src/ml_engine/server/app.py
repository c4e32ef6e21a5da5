"""The FastAPI app: routers, error handlers, auth, body limit, the static UI."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from omegaconf import DictConfig

from ml_engine import __version__
from ml_engine.server import routes_charts, routes_llm, routes_ml, routes_openai, routes_tokens
from ml_engine.server.errors import SafeJSONResponse, install_error_handlers
from ml_engine.server.guards import BodySizeLimit, HostOriginGuard, bearer_guard
from ml_engine.server.metrics import CONTENT_TYPE, RequestMetrics
from ml_engine.server.schemas import Health
from ml_engine.server.settings import Settings, load_settings
from ml_engine.server.state import ServerState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SERVICE_NAME = "ml-engine"
DOCS_ASSETS = "/docs-assets"


def _docs_assets_dir() -> Path | None:
    """Swagger UI's files as the ``fastapi-offline`` package ships them (a dependency).

    FastAPI's own /docs loads them from a public CDN at a floating version: blank on an
    offline machine, and foreign script on the origin where the UI keeps its token."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _add_docs(app: FastAPI) -> None:
    """/docs from the installed assets; without them no /docs page (/openapi.json stays)."""
    assets = _docs_assets_dir()
    if assets is None:
        log.warning("no Swagger UI assets (pip install fastapi-offline): /docs is not served")
        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )


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
        default_response_class=SafeJSONResponse,
        docs_url=None,  # served by _add_docs from installed files, never from a CDN
        redoc_url=None,
    )
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    # added last, so it runs first: a request not meant for this server reads no body
    app.add_middleware(
        HostOriginGuard,
        api_key=settings.api_key,
        bound_host=settings.host,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
    )
    # outermost: the refusals of the guards above are counted and timed too
    app.add_middleware(RequestMetrics, metrics=state.metrics)

    # HTTPBearer documents the scheme in /docs; bearer_guard does the checking and the 401
    protected = [Depends(HTTPBearer(auto_error=False)), Depends(bearer_guard(settings.api_key))]
    app.include_router(routes_ml.router, dependencies=protected)
    app.include_router(routes_charts.router, dependencies=protected)
    app.include_router(routes_llm.router, dependencies=protected)
    app.include_router(routes_openai.router, dependencies=protected)
    app.include_router(routes_tokens.router, dependencies=protected)

    @app.get("/health", response_model=Health, tags=["service"], summary="Liveness")
    async def health() -> dict[str, str]:
        # on the event loop: it needs no thread, so no load on the other routes can delay it
        return {"service": SERVICE_NAME, "status": "ok"}

    @app.get(
        "/metrics",
        tags=["service"],
        summary="Prometheus metrics (text format)",
        dependencies=protected,
        response_class=Response,
    )
    def metrics() -> Response:
        # behind the bearer key when one is set: route names and load reveal usage
        return Response(state.metrics.scrape(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_docs(app)
    return app
