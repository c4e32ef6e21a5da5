"""``/ml`` read-only views for the UI's charts: a job's or run's curves, sweep summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ml_engine.server.charts import (
    STUDY_MEDIA,
    SUMMARY_PNG,
    child_dir,
    find_sweeps,
    read_curves,
    study_file,
    study_plots,
    sweep_dir_named,
    sweep_rows,
)
from ml_engine.server.errors import NotFound
from ml_engine.server.jobs_store import FINAL_STATUSES
from ml_engine.server.state import ServerState

router = APIRouter(prefix="/ml", tags=["charts"])


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _shown(name: str) -> str:
    # a name from the URL goes back in a one-line message; long ones are cut
    return name[:64]


@router.get("/jobs/{job_id}/curves", summary="A training job's loss and accuracy curves")
def job_curves(request: Request, job_id: str) -> dict[str, Any]:
    job = _state(request).store.get(job_id)
    if job is None:
        raise NotFound(f"no job '{_shown(job_id)}'; see GET /ml/jobs")
    # the run dir comes from the job record the server wrote, never from the request
    curves = read_curves(Path(job.run_dir))
    return {
        "job": job.id,
        "run": Path(job.run_dir).name,
        "final": job.status in FINAL_STATUSES,
        **curves,
    }


@router.get("/runs/{run}/curves", summary="A run's loss and accuracy curves")
def run_curves(request: Request, run: str) -> dict[str, Any]:
    run_dir = child_dir(_state(request).settings.runs_dir, run)
    if run_dir is None:
        raise NotFound(f"no run '{_shown(run)}' under the runs directory; see GET /ml/models")
    return {"run": run_dir.name, **read_curves(run_dir)}


def _roots(request: Request) -> dict[str, Path]:
    return _state(request).settings.sweeps_dirs


@router.get("/sweeps", summary="Sweeps with a summary, newest first")
def list_sweeps(request: Request) -> dict[str, Any]:
    return {"sweeps": find_sweeps(_roots(request))}


def _sweep(request: Request, name: str) -> tuple[str, Path]:
    found = sweep_dir_named(_roots(request), name)
    if found is None:
        raise NotFound(f"no sweep '{_shown(name)}' with a summary.json; see GET /ml/sweeps")
    return found


@router.get("/sweeps/{name}", summary="A sweep's jobs, sorted by its metric")
def get_sweep(request: Request, name: str) -> dict[str, Any]:
    kind, sweep_dir = _sweep(request, name)
    table = sweep_rows(sweep_dir)
    if table is None:
        raise NotFound(f"sweep '{_shown(name)}' has no readable summary.json")
    has_plot = (sweep_dir / SUMMARY_PNG).is_file()
    plot = f"/ml/sweeps/{sweep_dir.name}/summary.png" if has_plot else None
    base = f"/ml/sweeps/{sweep_dir.name}/study"
    study = [
        {**p, "html": f"{base}/{p['html']}", "png": f"{base}/{p['png']}"}
        for p in study_plots(sweep_dir)
    ]
    return {"name": sweep_dir.name, "kind": kind, "plot": plot, "study": study, **table}


@router.get(
    "/sweeps/{name}/summary.png",
    response_class=FileResponse,
    summary="A sweep's plot (generation sweeps write one)",
)
def sweep_plot(request: Request, name: str) -> FileResponse:
    _, sweep_dir = _sweep(request, name)
    path = sweep_dir / SUMMARY_PNG
    if not path.is_file():
        raise NotFound(f"sweep '{_shown(name)}' has no summary.png")
    return FileResponse(path, media_type="image/png")


# a study page is Optuna's plotly HTML: it runs in a sandbox (an opaque origin), so a script in
# it could neither read the UI's stored API key nor call the API as the UI
STUDY_PAGE_HEADERS = {
    "Content-Security-Policy": "sandbox allow-scripts allow-downloads",
    "X-Content-Type-Options": "nosniff",
}


@router.get(
    "/sweeps/{name}/study/{file}",
    response_class=FileResponse,
    summary="A file of a sweep's study plots: a PNG, an interactive HTML page, its plotly.min.js",
)
def sweep_study_file(request: Request, name: str, file: str) -> FileResponse:
    _, sweep_dir = _sweep(request, name)
    # only names study/index.json lists (and plotly.min.js) are served, never a request's path
    path = study_file(sweep_dir, file)
    if path is None:
        raise NotFound(
            f"sweep '{_shown(name)}' has no study file '{_shown(file)}'; "
            f"see the study list of GET /ml/sweeps/{_shown(name)}"
        )
    media = STUDY_MEDIA[path.suffix]
    headers = (
        STUDY_PAGE_HEADERS if path.suffix == ".html" else {"X-Content-Type-Options": "nosniff"}
    )
    return FileResponse(path, media_type=media, headers=headers)
