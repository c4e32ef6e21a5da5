"""One generation job's model work: open the backend, benchmark, measure quality.

Runs inside the isolated worker process (see ``isolation``), so it takes and returns plain
JSON-ready data and imports nothing of Hydra or the training stack.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

from ml_engine.llm import measure_cache, progress
from ml_engine.llm.backends import SAMPLING_FIELDS, Sampling, open_backend
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.bench import run_benchmark, run_llama_bench
from ml_engine.llm.imatrix_gate import prepare_file
from ml_engine.llm.models import ModelFile, base_quantization, model_path
from ml_engine.llm.quality import QualitySettings, evaluate_quality
from ml_engine.llm.threads import physical_core_count


def sampling_from(llm: dict[str, Any]) -> Sampling:
    """The sampling settings of a resolved ``llm`` node."""
    return Sampling(**{key: llm[key] for key in SAMPLING_FIELDS})


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure_job(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` keys: llm (the resolved llm node), prompts, bench, quality, quantize,
    models_dir."""
    started = time.perf_counter()
    llm, models_dir = spec["llm"], Path(spec["models_dir"])
    bench = spec["bench"]
    from ml_engine.llm.memory_fit import rss_bytes

    if (llm.get("backend") or {}).get("name") != "mock":
        import llama_cpp  # noqa: F401  (before the first reading: the library is no load's)
    resolved, imatrix = _prepare_file(llm, spec, models_dir)
    rss_before = rss_bytes()  # the load's growth is what memory_fit estimates
    with _open(llm, models_dir, resolved) as backend:
        facts = backend.describe()
        resolved = getattr(backend, "model_file", None)
        facts["model_origin"] = resolved.origin if resolved else None
        facts["file_quantization"] = resolved.quantization if resolved else None
        facts["requantized"] = resolved.requantized if resolved else None
        timing = run_benchmark(
            backend,
            spec["prompts"],
            sampling_from(llm),
            warmup=int(bench["warmup"]),
            repetitions=int(bench["repetitions"]),
        )
        tests = _llama_bench(backend, bench)
        # Read before the quality step, which may load the base file as well.
        peak = peak_rss_mb()
        grown = rss_bytes() - rss_before if rss_before else None
        quality = _quality(backend, llm, spec, models_dir)
    work = {
        "facts": facts,
        "bench": timing,
        "llama_bench": tests,
        "peak_rss_mb": peak,
        "rss_growth_bytes": grown,
        "quality": quality,
        "imatrix": imatrix,
        "work_s": time.perf_counter() - started,
        "cached": False,
    }
    if resolved is not None:
        # kept as the model ran it, so a re-run (or a resumed search) need not load it again
        measure_cache.store(spec, resolved.path, work)
    return work


def _is_mock(llm: dict[str, Any]) -> bool:
    backend = llm.get("backend")
    return (backend.get("name") if isinstance(backend, dict) else backend) == "mock"


def _prepare_file(
    llm: dict[str, Any], spec: dict[str, Any], models_dir: Path
) -> tuple[ModelFile | None, dict[str, Any] | None]:
    """The file the job runs, made as ``quantize`` says (an importance matrix, gated by KLD
    with ``auto``; per-tensor types), and the record of how; the mock runs no file."""
    if _is_mock(llm):
        return None, None

    def open_file(path: Path) -> LlamaCppBackend:
        return LlamaCppBackend(
            path,
            n_gpu_layers=int(llm.get("n_gpu_layers", 0)),
            n_ctx=int(llm.get("n_ctx", 2048)),
            n_threads=llm.get("n_threads"),
            n_threads_batch=llm.get("n_threads_batch"),
            n_batch=int(llm.get("n_batch", 512)),
        )

    return prepare_file(
        llm,
        spec.get("quantize"),
        spec.get("quality") or {},
        models_dir,
        n_threads=llm.get("n_threads") or physical_core_count(),
        open_file=open_file,
    )


def _open(llm: dict[str, Any], models_dir: Path, resolved: ModelFile | None) -> Any:
    """The backend on ``resolved`` (quantizing, when the file was missing, reported its own
    phase)."""
    if _is_mock(llm):
        return open_backend(llm, models_dir)  # nothing to load
    model = llm.get("model") or {}
    name = Path(model["path"]).name if model.get("path") else model.get("name", "the model")
    quantization = llm.get("quantization")
    label = f"loading {name}" + (f" {quantization}" if quantization else "")
    with progress.phase(label):
        return open_backend(llm, models_dir, resolved)


def _llama_bench(backend: Any, bench: dict[str, Any]) -> list[dict[str, Any]]:
    """llama-bench's pp/tg tests on the loaded model (the mock has no model to test)."""
    if not isinstance(backend, LlamaCppBackend):
        return []
    return run_llama_bench(
        backend,
        n_prompt=bench.get("n_prompt"),
        n_gen=bench.get("n_gen"),
        repetitions=int(bench["repetitions"]),
        warmup=int(bench["warmup"]),
    )


def _quality(backend: Any, llm: dict[str, Any], spec: dict[str, Any], models_dir: Path) -> dict:
    settings = QualitySettings.from_spec(spec)
    if not settings.enabled or not isinstance(backend, LlamaCppBackend):
        return {}
    base = base_quantization(llm["model"], models_dir)
    base_file = model_path(llm["model"], base, models_dir) if base else None

    def open_base(path: Path) -> LlamaCppBackend:
        return LlamaCppBackend(
            path,
            n_gpu_layers=int(llm.get("n_gpu_layers", 0)),
            n_ctx=backend.n_ctx,
            n_threads=backend.n_threads,
            n_threads_batch=backend.n_threads_batch,
            n_batch=backend.n_batch,
        )

    return evaluate_quality(
        backend,
        base_file=base_file,
        base_quantization=base,
        models_dir=models_dir,
        settings=settings,
        open_base=open_base,
    )
