"""The server's settings, read once from the composed ``serve`` config."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml_engine.errors import UserError
from ml_engine.llm.memory_fit import parse_bytes


@dataclass(frozen=True)
class Range:
    """An inclusive allowed range, named in 422 messages."""

    low: float
    high: float

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_images: int = 64
    max_image_side: int = 4096
    max_image_bytes: int = 4 * 1024 * 1024
    max_total_pixels: int = 16 * 1024 * 1024
    max_prompt_chars: int = 8192
    max_tokens: Range = Range(1, 2048)
    n_ctx: Range = Range(128, 8192)
    n_gpu_layers: Range = Range(-1, 1000)
    epochs: Range = Range(1, 100)
    batch_size: Range = Range(1, 4096)
    lr: Range = Range(1e-6, 1.0)
    weight_decay: Range = Range(0.0, 1.0)
    seed: Range = Range(0, 2**31 - 1)


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    api_key: str | None
    runs_dir: Path
    jobs_db: Path
    models_dir: Path
    limits: Limits = field(default_factory=Limits)
    max_running_jobs: int = 1
    max_queued_jobs: int = 16
    max_queued_per_key: int = 8
    queue_retry_after_s: int = 30
    poll_interval_s: float = 0.5
    kill_grace_s: float = 5.0
    extra_overrides: tuple[str, ...] = ()
    train_models: tuple[str, ...] | None = None
    train_defaults: dict[str, Any] = field(default_factory=dict)
    # folders whose image data a job may train on again (POST /ml/train data_from)
    train_data_dirs: tuple[Path, ...] = ()
    predict_cache_size: int = 4
    predict_batch_window_ms: float = 5.0
    predict_max_batch: int = 64
    predict_torch_threads: int | None = 1
    default_predict_model: str = "cnn_mnist"
    llm_config_name: str = "generate"
    llm_models: tuple[str, ...] | None = None
    llm_cache_size: int = 2
    llm_cache_mb: float | None = None
    llm_worker_timeout_s: float | None = 300.0
    llm_stream_interval_ms: float = 20.0
    llm_produce_missing: bool = False
    # generations running at once, and waiting beyond them, before a 429 (Retry-After)
    llm_max_running: int = 2
    llm_max_queued: int = 8
    llm_retry_after_s: int = 5
    llm_exports_dir: Path | None = None
    llm_files: tuple[Path, ...] = ()
    llm_memory_budget: int | None = None  # bytes
    llm_idle_unload_s: float | None = None
    # sweep kind (train, generate) → the dir its sweeps are written under, for GET /ml/sweeps
    sweeps_dirs: dict[str, Path] = field(default_factory=dict)
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # the proxies whose X-Forwarded-For/-Proto are believed; none: every client is who it is
    forwarded_allow_ips: tuple[str, ...] = ()


def _limits(node: dict[str, Any]) -> Limits:
    values: dict[str, Any] = {}
    for key, value in node.items():
        if key not in Limits.__dataclass_fields__:
            accepted = ", ".join(Limits.__dataclass_fields__)
            raise UserError(f"unknown limit '{key}'; accepted: {accepted}")
        if isinstance(value, list):
            if len(value) != 2 or value[0] > value[1]:
                raise UserError(f"limits.{key}={value} is not valid; expected [low, high]")
            value = Range(value[0], value[1])
        values[key] = value
    return Limits(**values)


def _names(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


def _sweeps_dirs(value: Any) -> dict[str, Path]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and v for k, v in value.items()):
        raise UserError(f"sweeps_dirs={value!r} is not valid; expected {{kind: directory}}")
    return {kind: Path(str(path)).expanduser().resolve() for kind, path in value.items()}


# uvicorn's names (uvicorn.config.LOG_LEVELS)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _log_level(value: Any) -> str:
    level = str(value or "info").lower()
    if level not in LOG_LEVELS:
        raise UserError(f"log_level={value!r} is not valid; accepted: {', '.join(LOG_LEVELS)}")
    return level


def _megabytes(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"llm.cache_mb={value!r} is not valid; expected megabytes > 0 or null")
    return float(value)


def _max_loaded(llm: dict[str, Any]) -> Any:
    """``llm.max_loaded``, else the older ``llm.cache_size`` it replaces."""
    given = llm.get("max_loaded")
    return given if given is not None else llm.get("cache_size", 2)


def _idle_unload(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"llm.idle_unload_s={value!r} is not valid; expected seconds > 0 or null")
    return float(value)


def _worker_timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(
            f"llm.worker_timeout_s={value!r} is not valid; expected seconds > 0 or null"
        )
    return float(value)


def _stream_interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1000:
        raise UserError(
            f"llm.stream_interval_ms={value!r} is not valid; expected milliseconds in [0, 1000]"
        )
    return float(value)


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name}={value!r} is not valid; expected an integer ≥ {low}")
    return value


def _window_ms(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1000:
        raise UserError(
            f"predict.batch_window_ms={value!r} is not valid; expected milliseconds in [0, 1000]"
        )
    return float(value)


def _max_batch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"predict.max_batch={value!r} is not valid; expected an integer ≥ 1")
    return value


def _torch_threads(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"predict.torch_threads={value!r} is not valid; expected an integer ≥ 1 or null"
        )
    return value


_KEYS = ("host", "port", "api_key", "runs_dir", "jobs_db", "jobs", "train", "predict", "llm")
_KEYS += ("limits", "log_level", "allowed_hosts", "allowed_origins", "sweeps_dirs")
_KEYS += ("forwarded_allow_ips",)


def _allowed_hosts(value: Any) -> tuple[str, ...]:
    from ml_engine.server.guards import configured_host_name  # guards imports this module

    names = _names(value) or ()
    for name in names:
        if name != "*" and configured_host_name(name) is None:
            raise UserError(
                f"allowed_hosts entry {name!r} is not a host name; expected names like box.lan, "
                "box.lan:8080, 192.168.1.5 or [fe80::1], or '*' for any"
            )
    return names


def _forwarded_allow_ips(value: Any) -> tuple[str, ...]:
    addresses = _names(value) or ()
    for address in addresses:
        if address == "*":
            continue
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise UserError(
                f"forwarded_allow_ips entry {address!r} is not valid; expected the proxies' IP "
                "addresses or networks (10.0.0.2, 10.0.0.0/8, ::1), or '*' for every client"
            ) from None
    return addresses


SHUTDOWN_GRACE_S = 3


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's settings for this server, the ones ``serve.py`` runs it with.

    uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: any local client
    could then pick its own address, and with it a fresh share of the per-address job cap."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": list(settings.forwarded_allow_ips),
        # on SIGTERM/Ctrl-C the app cancels its generations at once (GracefulServer); what is
        # still open after this many seconds is cut, so the server always stops
        "timeout_graceful_shutdown": SHUTDOWN_GRACE_S,
    }


def _plain(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# queued-job caps (per server, per API key or client address) and the Retry-After beyond them
_QUEUE_CAPS = {"max_queued": 16, "max_queued_per_key": 8, "retry_after_s": 30}


def load_settings(cfg: DictConfig) -> Settings:
    """Resolve the config into plain values; a bad value is a one-line UserError."""
    # Only the keys the server reads are resolved: others (hydra's runtime dirs) may not be
    # resolvable when the app is built outside a Hydra run, as in tests.
    data = {key: _plain(cfg, key) for key in _KEYS}
    data["paths"] = {"models_dir": _plain(cfg, "paths.models_dir")}
    api_key = data.get("api_key") or None
    port = data.get("port")
    port = 18080 if port is None else port
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"port={port!r} is not valid; expected an integer in [0, 65535]")
    jobs = data.get("jobs") or {}
    max_running = jobs.get("max_running", 1)
    if not isinstance(max_running, int) or max_running < 1:
        raise UserError(f"jobs.max_running={max_running!r} is not valid; expected an integer ≥ 1")
    caps = {key: jobs.get(key, default) for key, default in _QUEUE_CAPS.items()}
    for key, value in caps.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"jobs.{key}={value!r} is not valid; expected an integer ≥ 1")
    train = data.get("train") or {}
    predict = data.get("predict") or {}
    llm = data.get("llm") or {}
    for key in ("runs_dir", "jobs_db"):
        if not data.get(key):
            raise UserError(f"{key} is required; give a directory path, e.g. {key}=outputs/...")
    return Settings(
        host=str(data.get("host") or "127.0.0.1"),
        port=port,
        api_key=str(api_key) if api_key else None,
        runs_dir=Path(data["runs_dir"]).expanduser().resolve(),
        jobs_db=Path(data["jobs_db"]).expanduser().resolve(),
        models_dir=Path(data["paths"]["models_dir"]).expanduser().resolve(),
        limits=_limits(data.get("limits") or {}),
        max_running_jobs=max_running,
        max_queued_jobs=caps["max_queued"],
        max_queued_per_key=caps["max_queued_per_key"],
        queue_retry_after_s=caps["retry_after_s"],
        poll_interval_s=float(jobs.get("poll_interval_s", 0.5)),
        kill_grace_s=float(jobs.get("kill_grace_s", 5.0)),
        extra_overrides=tuple(str(o) for o in jobs.get("extra_overrides") or ()),
        train_models=_names(train.get("models")),
        train_defaults=dict(train.get("defaults") or {}),
        train_data_dirs=tuple(Path(str(d)).expanduser() for d in train.get("data_dirs") or ()),
        predict_cache_size=int(predict.get("cache_size", 4)),
        predict_batch_window_ms=_window_ms(predict.get("batch_window_ms", 5.0)),
        predict_max_batch=_max_batch(predict.get("max_batch", 64)),
        predict_torch_threads=_torch_threads(predict.get("torch_threads", 1)),
        default_predict_model=str(predict.get("default_model", "cnn_mnist")),
        llm_config_name=str(llm.get("config_name", "generate")),
        llm_models=_names(llm.get("models")),
        # max_loaded is the name for cache_size: it wins when set
        llm_cache_size=_count("llm.max_loaded", _max_loaded(llm), low=1),
        llm_cache_mb=_megabytes(llm.get("cache_mb")),
        llm_worker_timeout_s=_worker_timeout(llm.get("worker_timeout_s", 300.0)),
        llm_stream_interval_ms=_stream_interval(llm.get("stream_interval_ms", 20.0)),
        llm_produce_missing=bool(llm.get("produce_missing", False)),
        llm_max_running=_count("llm.max_running", llm.get("max_running", 2), low=1),
        llm_max_queued=_count("llm.max_queued", llm.get("max_queued", 8), low=0),
        llm_retry_after_s=_count("llm.retry_after_s", llm.get("retry_after_s", 5), low=1),
        llm_exports_dir=(
            Path(llm["exports_dir"]).expanduser().resolve() if llm.get("exports_dir") else None
        ),
        llm_files=tuple(Path(str(f)) for f in llm.get("files") or ()),
        llm_memory_budget=parse_bytes(llm.get("memory_budget")),
        llm_idle_unload_s=_idle_unload(llm.get("idle_unload_s")),
        sweeps_dirs=_sweeps_dirs(data.get("sweeps_dirs")),
        log_level=_log_level(data.get("log_level")),
        allowed_hosts=_allowed_hosts(data.get("allowed_hosts")),
        allowed_origins=_names(data.get("allowed_origins")) or (),
        forwarded_allow_ips=_forwarded_allow_ips(data.get("forwarded_allow_ips")),
    )
