"""Request and response bodies. Requests are strict: an unknown field is a 422 naming it."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from ml_engine.llm.backends import BACKENDS
from ml_engine.server.jobs_store import FINAL_STATUSES, JOB_STATUSES
from ml_engine.training.choices import ACCELERATORS, SOURCES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def _check_name(value: str) -> str:
    """Configured names only: a path or anything that could climb directories is refused."""
    if "/" in value or "\\" in value or ".." in value or not _NAME.fullmatch(value):
        raise ValueError(
            f"'{value[:80]}' is not a name; give a configured name "
            "(letters, digits, '_', '-', '.'; no paths)"
        )
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate (U+D800..U+DFFF) in the strings of ``value``, if any.

    JSON may escape one (``"\\ud800"``) though no UTF-8 text can hold it: passed on, it breaks
    whatever encodes the string next (a response, a log line, a tokenizer)."""
    if isinstance(value, str):
        return next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    return next((found for item in items if (found := _lone_surrogate(item))), None)


Name = Annotated[
    str, AfterValidator(_check_name), Field(json_schema_extra={"pattern": NAME_PATTERN})
]


class StrictBody(BaseModel):
    # The original engine took executable paths and raw arguments from bodies; here anything
    # not declared is refused, named in the 422 with the accepted fields. The validator below
    # is the one check (pydantic's extra="forbid" could not name the accepted fields); the
    # schema says the same as additionalProperties: false.
    model_config = ConfigDict(json_schema_extra={"additionalProperties": False})

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                found = _lone_surrogate(key) or _lone_surrogate(value)
                if found is not None:
                    where = "a field name" if _lone_surrogate(key) else str(key)[:64]
                    raise ValueError(
                        f"{where} holds a lone surrogate (U+{ord(found):04X}), which is not "
                        "text; send valid Unicode"
                    )
        if isinstance(data, dict):
            unknown = [str(key)[:64] for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"unknown field(s): {', '.join(unknown)}; "
                    f"accepted: {', '.join(cls.model_fields)}"
                )
        return data


# ---- training -------------------------------------------------------------------------------

# built from the training package's lists, so a name added there is accepted here
Device = Literal[tuple(ACCELERATORS)]  # type: ignore[valid-type]
DataSource = Literal[SOURCES]  # type: ignore[valid-type]
JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]


class TrainOptions(StrictBody):
    epochs: int | None = Field(None, description="trainer.max_epochs (limits.epochs)")
    device: Device | None = Field(None, description="a device of GET /ml/models: devices")
    batch_size: int | None = Field(None, description="datamodule.batch_size (limits.batch_size)")
    lr: float | None = Field(None, description="model.optimizer.lr (limits.lr)")
    weight_decay: float | None = Field(
        None, description="model.optimizer.weight_decay (limits.weight_decay)"
    )
    seed: int | None = Field(None, description="seed (limits.seed)")
    data_source: DataSource | None = Field(None, description="datamodule.source")


class TrainRequest(TrainOptions):
    model: Name = Field(
        description="a network or model config the server trains, see GET /ml/models: train_models"
    )
    data_from: Name | None = Field(
        None,
        description="a run of GET /ml/runs whose data this job trains on (its image folder, "
        "torchvision dataset or MNIST source); default: MNIST digits (data_source)",
    )


class JobView(BaseModel):
    id: str
    model: str
    status: JobStatus
    request: dict[str, Any]
    run: str
    run_dir: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    final: bool = Field(description=f"the status is final ({', '.join(FINAL_STATUSES)})")


class JobList(BaseModel):
    jobs: list[JobView]


class TrainAllResponse(BaseModel):
    jobs: list[JobView]


# ---- models and prediction ------------------------------------------------------------------


class BestRun(BaseModel):
    run: str
    checkpoint: str
    val_acc: float | None
    test_acc: float | None
    date: str
    epochs_run: int | None
    data_source: str | None
    architecture: str = Field(description="its torchvision architecture (resnet18, ...) or network")
    data: dict[str, Any] = Field(description="what it trained on: kind, label and its settings")


class RunView(BestRun):
    network: str
    curves: str = Field(description="its loss, accuracy and learning-rate curves")
    trainable: bool = Field(description="POST /ml/train with data_from=<run> trains it again")
    train_model: str | None = Field(description="the model such a request names")
    not_trainable: str | None = Field(description="why the server cannot train it again")


class RunList(BaseModel):
    runs: list[RunView]


class NetworkView(BaseModel):
    name: str
    trainable: bool
    runs: int
    best: BestRun | None


class ModelList(BaseModel):
    models: list[NetworkView]
    train_models: list[str] = Field(description="what POST /ml/train may name as model")
    devices: list[str] = Field(description="devices a training request may name on this machine")
    default_device: str | None = Field(description="the device a request naming none trains on")


Row = Annotated[list[float], Field(min_length=28, max_length=28)]
Digit = Annotated[list[Row], Field(min_length=28, max_length=28)]


class PredictJson(StrictBody):
    images: list[Digit] = Field(
        min_length=1, description="28×28 arrays, values in [0, 255] or all in [0, 1]"
    )
    model: Name | None = Field(None, description="network whose best run predicts")
    run: Name | None = Field(None, description="a run name from GET /ml/models")


class DigitPrediction(BaseModel):
    index: int
    name: str
    digit: int
    # the predicted class's name from the checkpoint ("0".."9" for digit models)
    label: str
    confidence: float
    probabilities: list[float]


class PredictResponse(BaseModel):
    model: str
    run: str
    val_acc: float | None
    predictions: list[DigitPrediction]


# ---- generation -----------------------------------------------------------------------------


def _backend_alias(value: Any) -> Any:
    # the original engine called llama.cpp's backend "llama"
    return "llama_cpp" if value == "llama" else value


Backend = Annotated[Literal[BACKENDS], BeforeValidator(_backend_alias)]  # type: ignore[valid-type]


class GenerateRequest(StrictBody):
    backend: Backend = Field("llama_cpp", description="llama_cpp (alias: llama) or mock")
    model: Name = Field(
        "shakespeare", description="a configured or exported model, see GET /llm/models"
    )
    quantization: Name | None = Field(None, description="e.g. q8_0; default: the model's own")
    prompt: str = Field(description="limits.max_prompt_chars")
    max_tokens: int = Field(64, description="limits.max_tokens")
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_k: int = Field(40, ge=0, le=1000)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.1, ge=0.0, le=5.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    n_gpu_layers: int | None = Field(None, description="limits.n_gpu_layers; -1 = all")
    n_ctx: int | None = Field(None, description="limits.n_ctx")
    stream: bool = False


class GenerateResponse(BaseModel):
    engine: str
    model: str
    quantization: str | None
    output: str
    prompt: str
    params: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    timings: dict[str, float | None]


class LlmModelView(BaseModel):
    name: str
    quantizations_on_disk: list[str]
    default_quantization: str | None
    file_on_disk: bool = Field(description="the default quantization's file is on disk")
    embedded: bool = Field(description="written by the server on first use, needs no download")
    packaged: bool = Field(
        False, description="shipped with the package: a model trained by this project"
    )
    exported: bool = Field(
        False, description="a GGUF that export.py wrote into a training run (named by its file)"
    )
    file: str | None = Field(
        None, description="the GGUF named in the server's llm.files (this model is that file)"
    )
    usable: bool | None = Field(
        None,
        description="null: not loaded yet; true: loaded once; false: its file failed to load "
        "(see error)",
    )
    error: str | None = Field(None, description="why the file failed to load, when it did")


class LlmModelList(BaseModel):
    backends: list[str]
    models: list[LlmModelView]
    default_model: str | None = Field(
        description="a model that generates as is: one known to load, else a file on disk, "
        "else the embedded one; never one that failed to load; null when none"
    )


class Health(BaseModel):
    service: str
    status: str
