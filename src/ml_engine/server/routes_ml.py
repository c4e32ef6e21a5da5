"""``/ml``: networks and their best runs, every run with what it trained, training jobs,
digit prediction."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from ml_engine.run.rules import rules_by_key
from ml_engine.server.errors import ApiError, NotFound
from ml_engine.server.guards import check_range, require_json
from ml_engine.server.job_runner import REQUEST_TO_OVERRIDE
from ml_engine.server.jobs_store import FINAL_STATUSES, JOB_STATUSES, Job, QueueFull
from ml_engine.server.predict_service import arrays_to_digits, check_pixel_budget, decode_image
from ml_engine.server.runs import RunInfo, data_refusal, model_configs, training_refusal
from ml_engine.server.schemas import (
    JobList,
    JobView,
    ModelList,
    PredictJson,
    PredictResponse,
    RunList,
    TrainAllResponse,
    TrainOptions,
    TrainRequest,
    _check_name,
)
from ml_engine.server.state import ServerState
from ml_engine.training.choices import INVERT_CHOICES
from ml_engine.training.rules import TRAIN_RULES

router = APIRouter(prefix="/ml", tags=["ml"])

FORM_FIELDS = ("image", "model", "run", "invert")
# the training config's own rules, by the config key a request field sets
_TRAIN_RULES = rules_by_key(TRAIN_RULES)
# request fields with a configured allowed range (settings.Limits), the server's own policy
_LIMITED_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "seed")


class DamagedJob(BaseModel):
    id: str
    problem: str = Field(description="what is wrong with the job's stored record")


class JobListing(JobList):
    damaged: list[DamagedJob] = Field(
        default_factory=list,
        description="jobs whose stored record is damaged, by id (absent when none)",
    )


def _state(request: Request) -> ServerState:
    return request.app.state.server


def job_view(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "model": job.model,
        "status": job.status,
        "request": job.request,
        "run": Path(job.run_dir).name,
        "run_dir": job.run_dir,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": job.progress,
        "metrics": job.metrics,
        "error": job.error,
        "final": job.status in FINAL_STATUSES,
    }


# ---- models ---------------------------------------------------------------------------------


@router.get("/models", response_model=ModelList, summary="Registered networks and best runs")
def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    runs = state.runs.runs()
    best = state.runs.best_by_network()
    models = []
    for name in state.networks:
        info = best.get(name)
        best_view = None
        if info is not None:
            best_view = {k: v for k, v in info.to_dict().items() if k != "network"}
        models.append(
            {
                "name": name,
                "trainable": name in state.trainable,
                "runs": sum(1 for r in runs if r.network == name),
                "best": best_view,
            }
        )
    # the UI builds its device picker from these, so it never offers a GPU this machine lacks
    default_device = state.settings.train_defaults.get("device")
    return {
        "models": models,
        "train_models": train_models(state),
        "devices": list(state.devices),
        "default_device": default_device if default_device in state.devices else None,
    }


def train_models(state: ServerState) -> list[str]:
    """What ``POST /ml/train`` may name: the trainable networks, then the classifier configs of
    ``conf/model`` (resnet18, ...) that ``train.models`` allows."""
    allowed = state.settings.train_models
    presets = [m for m in model_configs() if allowed is None or m in allowed]
    return [*state.trainable, *(m for m in presets if m not in state.trainable)]


def _run_view(state: ServerState, info: RunInfo, models: list[str]) -> dict[str, Any]:
    why = training_refusal(info, models, state.settings.train_data_dirs)
    return {
        **info.to_dict(),
        "curves": f"/ml/runs/{info.run}/curves",
        "trainable": why is None,
        "train_model": info.architecture if why is None else None,
        "not_trainable": why,
    }


@router.get("/runs", response_model=RunList, summary="Every finished run, newest first")
def list_runs(request: Request) -> dict[str, Any]:
    state = _state(request)
    models = train_models(state)
    return {"runs": [_run_view(state, info, models) for info in state.runs.newest_first()]}


# ---- training jobs --------------------------------------------------------------------------


def _training_request(state: ServerState, options: TrainOptions) -> dict[str, Any]:
    """Validated request values with the server's defaults filled in."""
    limits = state.settings.limits
    values = options.model_dump(exclude_none=True, exclude={"model"})
    for key, default in state.settings.train_defaults.items():
        values.setdefault(key, default)
    # the configured range first: its message names the bounds this server allows
    for field in _LIMITED_FIELDS:
        check_range(field, values.get(field), getattr(limits, field))
    # then what the training job itself would refuse (configured limits may be looser, and
    # train.defaults never went through the request schema)
    for field, key in REQUEST_TO_OVERRIDE.items():
        rule = _TRAIN_RULES.get(key)
        refusal = rule.refusal(values[field], name=field) if rule and field in values else None
        if refusal:
            raise ApiError(422, refusal)
    device = values.get("device")
    if device is not None and device not in state.devices:
        raise ApiError(
            422,
            f"device '{device}' is not available on this server; accepted: "
            + ", ".join(state.devices),
        )
    return values


def _owner(request: Request, state: ServerState) -> str:
    """Whose queued jobs a request's jobs count against: its API key (a digest, never the key
    itself) or, with no key configured, its client address."""
    if state.settings.api_key is not None:
        token = request.headers.get("authorization", "").partition(" ")[2].strip()
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "?")


def _submit_all(
    request: Request,
    state: ServerState,
    models: list[str],
    options: TrainOptions,
    data: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    values = _training_request(state, options)
    if data is not None:
        values = _with_data(values, data, options.data_source)
    jobs = [(model, {"model": model, **values}) for model in models]
    try:
        created = state.jobs.submit_many(jobs, _owner(request, state))
    except QueueFull as full:
        raise _queue_full(state, full, len(jobs)) from None
    return [job_view(job) for job in created]


def _queue_full(state: ServerState, full: QueueFull, asked: int) -> ApiError:
    settings = state.settings
    if full.scope == "server":
        where, key = "on this server", "jobs.max_queued"
    else:
        who = "API key" if settings.api_key is not None else "client address"
        where, key = f"for this {who}", "jobs.max_queued_per_key"
    return ApiError(
        429,
        f"{full.queued} training jobs are queued {where} and {asked} more would pass the "
        f"limit of {full.limit} ({key}); retry when some have started",
        headers={"Retry-After": str(settings.queue_retry_after_s)},
    )


@router.post(
    "/train",
    status_code=202,
    response_model=JobView,
    summary="Queue a training job",
    dependencies=[Depends(require_json)],
)
def train(request: Request, body: TrainRequest) -> dict[str, Any]:
    state = _state(request)
    accepted = train_models(state)
    if body.model not in accepted:
        # in the server's order (networks first), not sorted as UnknownNameError would
        raise ApiError(
            422,
            f"unknown model '{body.model}'; accepted: {', '.join(accepted)}",
            accepted=accepted,
        )
    data = _data_from(state, body.data_from) if body.data_from else None
    return _submit_all(request, state, [body.model], body, data)[0]


def _data_from(state: ServerState, run: str) -> dict[str, Any]:
    """The data run ``run`` trained on, when the server may train on it again."""
    try:
        info = state.runs.get(run)
    except LookupError:
        raise ApiError(422, f"data_from: no run '{run}'; give a run of GET /ml/runs") from None
    why = data_refusal(info.data or {}, state.settings.train_data_dirs)
    if why is not None:
        raise ApiError(422, f"data_from: cannot train on the data of run '{run}': {why}")
    return {k: v for k, v in (info.data or {}).items() if k != "label"}


def _with_data(values: dict[str, Any], data: dict[str, Any], asked: str | None) -> dict[str, Any]:
    """The request's values training on ``data``: an MNIST source only applies to MNIST runs
    (one asked for wins over the run's)."""
    if data["kind"] != "mnist":
        if asked is not None:
            raise ApiError(
                422,
                f"data_source={asked} applies to MNIST digits; the run named by data_from "
                f"trained on {data['kind']} (leave data_source out)",
            )
    elif asked is not None:
        data = {**data, "source": asked}
    # the data carries its source: a configured default must not override the run's
    return {**{k: v for k, v in values.items() if k != "data_source"}, "data": data}


@router.post(
    "/train-all",
    status_code=202,
    response_model=TrainAllResponse,
    summary="Queue one training job per trainable network",
    dependencies=[Depends(require_json)],
)
def train_all(request: Request, body: Annotated[TrainOptions | None, Body()] = None) -> dict:
    state = _state(request)
    return {"jobs": _submit_all(request, state, state.trainable, body or TrainOptions())}


@router.get(
    "/jobs",
    response_model=JobListing,
    # "damaged" only when there are: the body of a sound database is as it always was
    response_model_exclude_unset=True,
    summary="Training jobs, newest first",
)
def list_jobs(
    request: Request,
    status: Annotated[str | None, Query(description=", ".join(JOB_STATUSES))] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    if status is not None and status not in JOB_STATUSES:
        raise ApiError(422, f"status '{status}' is not valid; accepted: {', '.join(JOB_STATUSES)}")
    jobs = _state(request).store.list(status, limit)
    listing: dict[str, Any] = {"jobs": [job_view(job) for job in jobs if job.damage is None]}
    damaged = [{"id": job.id, "problem": job.damage} for job in jobs if job.damage]
    if damaged:
        listing["damaged"] = damaged
    return listing


def _job(state: ServerState, job_id: str) -> Job:
    job = state.store.get(job_id)
    if job is None:
        raise NotFound(f"no job '{job_id[:64]}'; see GET /ml/jobs")
    if job.damage is not None:
        raise ApiError(
            500,
            f"job '{job.id}' has a damaged record ({job.damage}); "
            "GET /ml/jobs lists it under 'damaged'",
        )
    return job


@router.get("/jobs/{job_id}", response_model=JobView, summary="One job's status and progress")
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    return job_view(_job(_state(request), job_id))


@router.delete("/jobs/{job_id}", response_model=JobView, summary="Cancel a queued or running job")
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    state = _state(request)
    job = _job(state, job_id)
    if job.status in FINAL_STATUSES:
        raise ApiError(
            409, f"job '{job_id}' already {job.status}; only queued or running jobs cancel"
        )
    return job_view(state.jobs.cancel(job_id) or job)


# ---- prediction -----------------------------------------------------------------------------

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "model": {"type": "string"},
        "run": {"type": "string"},
        "invert": {"type": "string", "enum": list(INVERT_CHOICES)},
    },
}

PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PredictJson.model_json_schema()},
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}


def _text_field(value: Any, field: str) -> str | None:
    """A form field that must be text; a file sent in its place is named, never shown (its
    repr would leak the server's objects into the reply)."""
    if value is None or isinstance(value, str):
        return value
    raise ApiError(422, f"{field} must be a text field, not a file")


def _optional_name(value: Any, field: str) -> str | None:
    value = _text_field(value, field)
    if value is None or value == "":
        return None
    try:
        return _check_name(value)
    except ValueError as exc:
        raise ApiError(422, f"{field}: {exc}") from None


async def _read_multipart(request: Request, state: ServerState) -> tuple[list, dict[str, Any]]:
    limits = state.settings.limits
    form = await request.form(max_files=limits.max_images, max_fields=len(FORM_FIELDS))
    unknown = sorted({key for key in form if key not in FORM_FIELDS})
    if unknown:
        raise ApiError(
            422, f"unknown field(s): {', '.join(unknown)}; accepted: {', '.join(FORM_FIELDS)}"
        )
    uploads = form.getlist("image")
    if not uploads:
        raise ApiError(422, "missing field 'image': send one or more PNG/JPEG files as 'image'")
    images = []
    for index, upload in enumerate(uploads):
        if not isinstance(upload, UploadFile):
            raise ApiError(422, f"image #{index} is not a file; send PNG/JPEG files as 'image'")
        # the client's filename is only echoed back, never used as a path
        name = (upload.filename or f"image[{index}]")[:128]
        images.append((name, await upload.read()))
    invert = _text_field(form.get("invert"), "invert") or "auto"
    if invert not in INVERT_CHOICES:
        raise ApiError(
            422, f"invert={invert[:64]!r} is not valid; accepted: {', '.join(INVERT_CHOICES)}"
        )
    options = {
        "model": _optional_name(form.get("model"), "model"),
        "run": _optional_name(form.get("run"), "run"),
        "invert": invert,
    }
    return images, options


async def _read_json(request: Request) -> PredictJson:
    body = await request.body()
    try:
        return PredictJson.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


def _count_check(count: int, state: ServerState) -> None:
    high = state.settings.limits.max_images
    if not 1 <= count <= high:
        raise ApiError(422, f"{count} images sent; allowed: [1, {high}] per request")


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Digits and class probabilities for PNG/JPEG uploads or 28×28 arrays",
    openapi_extra=PREDICT_OPENAPI,
)
async def predict(request: Request) -> dict[str, Any]:
    state = _state(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await _read_json(request)
        _count_check(len(body.images), state)
        names = [f"images[{i}]" for i in range(len(body.images))]
        run = _resolve_run(state, body.model, body.run)
        model = await _model(state, run)
        if not model.hparams.data["digits"]:
            raise ApiError(422, _arrays_refused(run, model.hparams.data))
        inputs = await run_in_threadpool(arrays_to_digits, body.images)
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        images, options = await _read_multipart(request, state)
        _count_check(len(images), state)
        check_pixel_budget(images, state.settings.limits)
        names = [name for name, _ in images]
        run = _resolve_run(state, options["model"], options["run"])
        model = await _model(state, run)
        limits, invert, spec = state.settings.limits, options["invert"], model.hparams.data

        def decode_all() -> Any:
            import numpy as np

            return np.stack(
                [decode_image(data, name, limits, invert, spec) for name, data in images]
            )

        # decoding is CPU work: off the event loop, which keeps reading other requests
        inputs = await run_in_threadpool(decode_all)
    else:
        raise ApiError(
            415,
            f"content type '{content_type or 'none'}' is not accepted; accepted: "
            "multipart/form-data (field 'image') or application/json ({'images': [...]})",
        )
    result = await state.predictor.predict(inputs, run, model)
    return result.to_dict(names)


async def _model(state: ServerState, run: Any) -> Any:
    """The run's classifier: from the cache on the event loop, a first load in a thread."""
    cached = state.predictor.cached_model(run)
    return cached if cached is not None else await run_in_threadpool(state.predictor.model_for, run)


def _arrays_refused(run: Any, spec: dict[str, Any]) -> str:
    shape = "×".join(str(n) for n in (spec["channels"], *spec["image_size"]))
    return (
        f"run '{run.run}' classifies {shape} images, not 28×28 digit arrays; "
        "send its images as PNG/JPEG uploads (multipart field 'image')"
    )


def _resolve_run(state: ServerState, model: str | None, run: str | None) -> Any:
    return state.predictor.resolve_run(model, run, state.settings.default_predict_model)
