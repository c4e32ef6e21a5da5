"""Measurements reused across runs (``bench.cache=true``; the ``llm_target`` search turns it on).

A measurement is keyed by what decides it: the sha256 of the GGUF file that runs (and of the
quality base it is compared with), every setting that changes a figure (the resolved ``llm``
node without the model's name or path, the prompts, the ``bench`` and ``quality`` settings) and
the llama.cpp build (llama-cpp-python's version and ``llama_print_system_info``). Settings added
to those nodes later are part of the key without a change here. The same file under another
path is the same measurement; a re-exported file with new weights is a new one.

Entries live under ``<models_dir>/.measurements/`` (``<key>.json``, written atomically, so a
kill mid-search leaves whole entries only and the next run reuses them). Hashing a multi-GB file
takes seconds, so a file's hash is kept in ``hashes/`` by path, size and modification time. An
unreadable or malformed entry is ignored (the job measures again and rewrites it), never an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.models import base_quantization, default_quantization, model_path
from ml_engine.run.files import write_json_atomic

log = logging.getLogger(__name__)

CACHE_DIR = ".measurements"
# bump when the entry layout or the key's meaning changes: old entries are then simply not found
KEY_VERSION = 1
_CHUNK = 8 * 1024 * 1024
# llm keys that do not change a measurement: the search's own settings, how a file is obtained,
# and the model node (its file is keyed by content; chat_template/ignore_eos are kept below)
_NOT_MEASURED_LLM = ("target", "allow_download", "model")
_MODEL_KEYS_MEASURED = ("chat_template", "ignore_eos")
_NOT_MEASURED_BENCH = ("cache",)
_NOT_MEASURED_BACKEND = ("verbose",)


def enabled(spec: Mapping[str, Any]) -> bool:
    """Caching applies to llama.cpp measurements when ``bench.cache`` is on (a mock echo is no
    measurement worth keeping)."""
    backend = (spec["llm"].get("backend") or {}).get("name")
    return bool(spec["bench"].get("cache")) and backend == "llama_cpp" and _plain_quantization(spec)


def _plain_quantization(spec: Mapping[str, Any]) -> bool:
    """The file is llama.cpp's plain quantization: its key is the plain file's hash. A file made
    with an importance matrix or per-tensor types (which ``auto`` may or may not keep) is made
    and measured afresh."""
    quantize = spec.get("quantize") or {}
    return str(quantize.get("imatrix") or "none") == "none" and not quantize.get("tensor_types")


def cache_root(spec: Mapping[str, Any]) -> Path:
    return Path(spec["models_dir"]) / CACHE_DIR


def file_sha256(path: Path, root: Path) -> str:
    """sha256 of ``path``'s bytes, remembered under ``root/hashes`` by path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    record = root / "hashes" / (hashlib.sha1(str(path).encode()).hexdigest()[:20] + ".json")
    try:
        known = json.loads(record.read_text())
        if (
            known["path"] == str(path)
            and known["size"] == stat.st_size
            and known["mtime_ns"] == stat.st_mtime_ns
            and len(known["sha256"]) == 64
        ):
            return str(known["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not hashed yet, changed since, or a damaged record: hash again
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    sha = digest.hexdigest()
    write_json_atomic(
        record,
        {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha},
    )
    return sha


@functools.lru_cache(maxsize=1)
def build_id() -> dict[str, str]:
    """The llama.cpp build that measures: another build (version, CPU features, GPU backend)
    may give other figures."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {
        "llama_cpp_python": str(llama_cpp.__version__),
        "system_info": info.decode(errors="replace") if isinstance(info, bytes) else str(info),
    }


def measured_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a job's spec that changes its figures (see the module docstring)."""
    llm = {k: v for k, v in spec["llm"].items() if k not in _NOT_MEASURED_LLM}
    backend = llm.get("backend") or {}
    llm["backend"] = {k: v for k, v in backend.items() if k not in _NOT_MEASURED_BACKEND}
    model = spec["llm"].get("model") or {}
    llm["model"] = {k: model.get(k) for k in _MODEL_KEYS_MEASURED}
    quality = dict(spec.get("quality") or {})
    text_path = quality.get("text_path")
    if text_path and Path(text_path).expanduser().is_file():
        quality["text_sha256"] = hashlib.sha256(
            Path(text_path).expanduser().read_bytes()
        ).hexdigest()
    bench = {k: v for k, v in spec["bench"].items() if k not in _NOT_MEASURED_BENCH}
    return {"llm": llm, "prompts": list(spec["prompts"]), "bench": bench, "quality": quality}


def _quality_base_file(spec: Mapping[str, Any]) -> Path | None:
    if not (spec.get("quality") or {}).get("enabled", True):
        return None
    model, models_dir = spec["llm"]["model"], Path(spec["models_dir"])
    base = base_quantization(model, models_dir)
    path = model_path(model, base, models_dir) if base else None
    return path if path is not None and path.is_file() else None


def measurement_key(spec: Mapping[str, Any], model_file: Path) -> str:
    root = cache_root(spec)
    base = _quality_base_file(spec)
    payload = {
        "version": KEY_VERSION,
        "file_sha256": file_sha256(model_file, root),
        "quality_base_sha256": file_sha256(base, root) if base is not None else None,
        "settings": measured_settings(spec),
        "build": build_id(),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_on_disk(spec: Mapping[str, Any]) -> Path | None:
    """The file this job would run, when it is already on disk (nothing is produced here)."""
    model = spec["llm"]["model"]
    quantization = spec["llm"].get("quantization") or default_quantization(model)
    if quantization is None:
        return None
    try:
        path = model_path(model, str(quantization), Path(spec["models_dir"]))
    except UserError:  # an unknown name: the job itself reports it
        return None
    return path if path.is_file() else None


def _entry_path(spec: Mapping[str, Any], key: str) -> Path:
    return cache_root(spec) / f"{key}.json"


def _valid_work(work: Any) -> bool:
    return (
        isinstance(work, dict)
        and isinstance(work.get("facts"), dict)
        and isinstance(work.get("bench"), dict)
        and isinstance(work["bench"].get("prompts"), list)
    )


def lookup(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached model work for ``spec`` (marked ``cached``), or None: caching off, the file
    not on disk yet, no entry, or an entry that is damaged (ignored, later rewritten)."""
    if not enabled(spec):
        return None
    model_file = file_on_disk(spec)
    if model_file is None:
        return None
    key = measurement_key(spec, model_file)
    path = _entry_path(spec, key)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        work = entry["work"] if entry.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        work = None
    if not _valid_work(work):
        log.warning("ignoring a damaged measurement cache entry %s (measuring again)", path)
        return None
    log.info("measurement reused from %s (no model loaded)", path)
    return {**work, "cached": True, "cache_entry": str(path)}


def store(spec: Mapping[str, Any], model_file: Path, work: Mapping[str, Any]) -> Path | None:
    """Keep ``work`` (a fresh measurement of ``model_file``) for later runs."""
    if not enabled(spec):
        return None
    key = measurement_key(spec, model_file)
    path = _entry_path(spec, key)
    kept = {k: v for k, v in work.items() if k not in ("cached", "cache_entry")}
    write_json_atomic(path, {"key": key, "file": str(model_file), "work": kept})
    return path
