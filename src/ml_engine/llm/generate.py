"""Generation: prompts → model work (isolated) → result.json, texts, TensorBoard → metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ml_engine.errors import UserError
from ml_engine.llm import measure_cache
from ml_engine.llm.backends.base import CHAT_TEMPLATE_MISSING, CHAT_TEMPLATE_UNKNOWN
from ml_engine.llm.bench import as_sizes, check_fits, first_tests
from ml_engine.llm.gguf_writer import held_out_text_path
from ml_engine.llm.isolation import call_target, run_isolated
from ml_engine.llm.llama_bench_format import markdown, rows_of, write_formats
from ml_engine.llm.metrics import (
    curve_points,
    definitions,
    descriptions,
    final_metrics,
    report_text,
    row_of,
)
from ml_engine.llm.models import file_model_node, is_file_model, read_gguf_facts
from ml_engine.llm.tensorboard_log import log_run
from ml_engine.run.extras import apply_extras
from ml_engine.run.files import (
    RESOLVED_CONFIG,
    save_resolved_config,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

MEASURE = "ml_engine.llm.measure:measure_job"


def selected_prompts(cfg: DictConfig) -> list[str]:
    """``prompt=...`` alone when given, else the prompt set's items; never empty."""
    single = cfg.get("prompt")
    if single is not None:
        if not isinstance(single, str) or not single.strip():
            raise UserError("prompt is empty; expected non-empty text, e.g. prompt='Write a haiku'")
        return [single]
    prompts = cfg.get("prompts") or {}
    items = prompts.get("items")
    name = prompts.get("name", "?")
    if not items:
        raise UserError(
            f"prompt set '{name}' is empty; expected at least one prompt in prompts.items"
        )
    bad = [i for i, p in enumerate(items) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise UserError(
            f"prompts.items[{bad[0]}] of set '{name}' is empty; expected non-empty text"
        )
    return list(items)


def _resolve_file_model(cfg: DictConfig) -> None:
    """With ``llm.model.path``, the model node becomes the file's own (name and quantization
    from its GGUF metadata), so every record of the run names what actually ran."""
    if not is_file_model(cfg.llm.model):
        return
    node = file_model_node(cfg.llm.model)
    with open_dict(cfg):
        cfg.llm.model = node
    output_dir = Path(cfg.paths.output_dir)
    if (output_dir / RESOLVED_CONFIG).is_file():  # the job wrapper's copy: keep it true
        save_resolved_config(cfg, output_dir)


def _quality_for_file_model(cfg: DictConfig) -> None:
    """A ``llm.model.path`` file is measured on its own held-out text when one lies beside it
    (``<stem>.val.txt``, as ``export.py`` writes) and no ``quality.text_path`` is given, in
    chunks no longer than the context it was trained on: positions past it measure how the
    model extrapolates, not how a quantization changes it."""
    quality = cfg.get("quality")
    if not is_file_model(cfg.llm.model) or not quality or not quality.get("enabled", True):
        return
    path = Path(cfg.llm.model.path)
    changed = False
    held_out = held_out_text_path(path)
    if quality.get("text_path") is None and held_out.is_file():
        log.info("quality measured on %s (the held-out text beside the file)", held_out)
        with open_dict(cfg):
            cfg.quality.text_path = str(held_out)
        changed = True
    try:
        trained = read_gguf_facts(path).context_length
    except (OSError, ValueError, KeyError, IndexError):
        trained = None  # the model worker lets llama.cpp say what is wrong with the file
    if trained and int(quality.n_ctx) > trained:
        log.info(
            "quality.n_ctx=%d lowered to %d, the context %s was trained on",
            quality.n_ctx,
            trained,
            path.name,
        )
        with open_dict(cfg):
            cfg.quality.n_ctx = trained
        changed = True
    output_dir = Path(cfg.paths.output_dir)
    if changed and (output_dir / RESOLVED_CONFIG).is_file():
        save_resolved_config(cfg, output_dir)


def _check_quality_text(cfg: DictConfig) -> None:
    quality = cfg.get("quality") or {}
    text_path = quality.get("text_path") if quality.get("enabled", True) else None
    if text_path is not None and not Path(text_path).expanduser().is_file():
        raise UserError(f"quality.text_path={text_path}: no such file")


def _check_quantize(cfg: DictConfig) -> None:
    """Before any work: a matrix file that is no importance matrix, a type name llama.cpp does
    not know, a pattern that is not a regular expression — each one line."""
    from ml_engine.llm.imatrix import read_imatrix
    from ml_engine.llm.imatrix_gate import AUTO, NONE, check_setting
    from ml_engine.llm.quantize import check_tensor_types

    quantize = cfg.get("quantize") or {}
    setting = check_setting(quantize.get("imatrix", NONE))
    if setting not in (AUTO, NONE):
        read_imatrix(Path(setting))
    check_tensor_types(dict(quantize.get("tensor_types") or {}))


def _check_bench_fits(cfg: DictConfig) -> None:
    """Before any work: llama.cpp may round n_ctx up, never down, so a test that fits the
    requested context fits the one it allocates."""
    n_ctx = int(cfg.llm.n_ctx)
    bench = cfg.bench
    check_fits(as_sizes(bench.get("n_prompt")), as_sizes(bench.get("n_gen")), n_ctx, n_ctx)


def _memory_fit(cfg: DictConfig) -> dict[str, Any] | None:
    """memory_fit's estimate of the load, from the file's header, before any work: past
    ``llm.memory_budget`` it is refused in one line. None when there is no file to read yet
    (the mock; a quantization still to be produced, the embedded model still to be written)."""
    from ml_engine.llm.memory_fit import check_budget, estimate, parse_bytes
    from ml_engine.llm.models import model_path

    budget = parse_bytes(cfg.llm.get("memory_budget"))
    if cfg.llm.backend.name == "mock":
        return None
    try:
        path = model_path(cfg.llm.model, str(cfg.llm.quantization), Path(cfg.paths.models_dir))
        if not path.is_file():
            return None
        found = estimate(path, int(cfg.llm.n_ctx), n_batch=int(cfg.llm.get("n_batch") or 512))
    except (OSError, ValueError, UserError):  # an unreadable file: the load says what is wrong
        return None
    check_budget(found, budget, f"{path.name} at n_ctx={cfg.llm.n_ctx}")
    return {**found.as_dict(), "budget_bytes": budget}


def _memory_report(memory: dict[str, Any] | None, work: dict[str, Any]) -> dict[str, Any] | None:
    """result.json's ``memory``: the estimate of the load against the worker's RSS growth
    from before the load to after llama-bench's tests (every buffer touched)."""
    if memory is None:
        return None
    measured = work.get("rss_growth_bytes")
    ratio = memory["load_bytes"] / measured if measured else None
    return {
        "estimate_bytes": memory["load_bytes"],
        "estimate_total_bytes": memory["total_bytes"],
        "measured_bytes": measured,
        "estimate_over_measured": round(ratio, 4) if ratio else None,
        "parts": memory,
    }


def _notes(facts: dict[str, Any]) -> list[str]:
    """What a reader of result.json must know about how the prompts and the file were used."""
    notes = []
    status = facts.get("chat_template")
    if status in (CHAT_TEMPLATE_MISSING, CHAT_TEMPLATE_UNKNOWN):
        why = (
            "the file has no chat template"
            if status == CHAT_TEMPLATE_MISSING
            else "llama.cpp cannot apply the file's chat template"
        )
        notes.append(
            f"chat_template=true, but {why}: no template was applied, the prompts ran as given"
        )
    if facts.get("requantized"):
        notes.append("requantized: made from an already-quantized file (llm.allow_requantize=true)")
    return notes


def _job_spec(cfg: DictConfig, prompts: list[str]) -> dict[str, Any]:
    return {
        "llm": OmegaConf.to_container(cfg.llm, resolve=True),
        "prompts": prompts,
        "bench": OmegaConf.to_container(cfg.bench, resolve=True),
        "quality": OmegaConf.to_container(cfg.quality, resolve=True),
        "quantize": OmegaConf.to_container(cfg.quantize, resolve=True)
        if cfg.get("quantize")
        else None,
        "models_dir": str(Path(cfg.paths.models_dir).resolve()),
    }


def _run_model_work(cfg: DictConfig, spec: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    # looked up here, before a worker starts: a cached measurement loads no model at all
    cached = measure_cache.lookup(spec)
    if cached is not None:
        return cached
    if not cfg.worker.isolate:
        return call_target(MEASURE, spec)
    return run_isolated(
        MEASURE,
        spec,
        log_path=output_dir / "worker.log",
        timeout_s=float(cfg.worker.timeout_s),
        cleanup_dirs=(Path(spec["models_dir"]),),
    )


def flat_metrics(cfg: DictConfig, work: dict[str, Any]) -> dict[str, Any]:
    """The job's one-row view (``metrics.METRICS``): what summary tables, sweepers and HParams
    read."""
    parts = {
        "setting": OmegaConf.to_container(cfg.llm, resolve=True),
        "facts": work["facts"],
        "bench": work["bench"],
        "tests": first_tests(work.get("llama_bench") or []),
        "quality": work.get("quality") or {},
        "imatrix": work.get("imatrix") or {},
        "work": work,
    }
    return row_of(parts)


def _write_texts(output_dir: Path, bench: dict[str, Any]) -> list[str]:
    folder = output_dir / "texts"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, entry in enumerate(bench["prompts"]):
        name = f"texts/{index:02d}.txt"
        write_text_atomic(output_dir / name, entry["text"])
        names.append(name)
    return names


_HPARAM_KEYS = (
    "quantization",
    "n_gpu_layers",
    "n_ctx",
    "n_threads",
    "n_threads_batch",
    "n_batch",
    "flash_attn",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repeat_penalty",
    "seed",
)


def _log_to_tensorboard(cfg: DictConfig, work: dict[str, Any], metrics: dict[str, Any]) -> None:
    reps = [r for p in work["bench"]["prompts"] for r in p["repetitions"]]
    hparams = {key: cfg.llm.get(key) for key in _HPARAM_KEYS}
    hparams.update(
        model=cfg.llm.model.name, backend=cfg.llm.backend.name, repetitions=cfg.bench.repetitions
    )
    # null threads mean "the physical cores": HParams shows the count llama.cpp got
    for key in ("n_threads", "n_threads_batch"):
        if hparams[key] is None:
            hparams[key] = metrics.get(key)
    log_run(
        OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None,
        curve_points(reps),
        hparams,
        final_metrics(metrics),
        descriptions(),
    )


def _report_line(metrics: dict[str, Any]) -> str:
    if metrics["backend"] == "mock":
        return f"MOCK echo backend (no model): {metrics['completion_tokens']} words echoed"
    requantized = " (requantized)" if metrics.get("requantized") else ""
    cached = " (cached)" if metrics.get("cached") else ""
    return (
        f"{metrics['model']} {metrics['quantization']}{requantized} "
        f"ngl={metrics['n_gpu_layers']} ({metrics['backend']}, {metrics['compute_backend']})"
        f"{cached}: {report_text(metrics)}"
    )


# a text is shown up to this many lines and characters; the rest is in its file
TEXT_LINES = 20
TEXT_CHARS = 1200
PROMPT_CHARS = 60


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# a model's text may hold any character: control ones (an escape sequence) would act on the
# terminal instead of being shown
_CONTROL = {code: "\ufffd" for code in [*range(0x20), 0x7F] if chr(code) not in "\n\t"}


def _shortened(text: str, limit: int) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def shown_text(text: str, path: Path) -> str:
    """``text`` as a terminal shows it: its first ``TEXT_LINES`` lines and ``TEXT_CHARS``
    characters, then how much more there is and where."""
    kept = "\n".join(text.splitlines()[:TEXT_LINES])[:TEXT_CHARS]
    rest = len(text) - len(kept)
    shown = kept.translate(_CONTROL)
    if rest > len(text) - len(text.rstrip()):  # more than trailing blanks was left out
        shown += f"\n[… {rest} more characters in {path}]"
    return shown


def _print_texts(prompts: list[dict[str, Any]], names: list[str], output_dir: Path) -> None:
    for index, (entry, name) in enumerate(zip(prompts, names, strict=True), start=1):
        header = (
            f"--- text {index}/{len(prompts)} (finish: {entry['finish_reason']}), "
            f"prompt {_shortened(entry['prompt'], PROMPT_CHARS)!r} ---"
        )
        print(header, flush=True)
        print(shown_text(entry["text"], output_dir / name), flush=True)


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Benchmark generation for the configured model and settings; returns the flat metrics.

    Writes ``result.json`` (everything measured), ``texts/NN.txt`` (one per prompt),
    ``llama-bench.<fmt>`` (the pp/tg tests, per ``bench.formats``) and the configured loggers'
    files into the run dir. The config was checked against
    ``llm.rules.GENERATE_RULES`` by the entrypoint (``run_job``) before this runs.
    """
    prompts = selected_prompts(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _resolve_file_model(cfg)
    _quality_for_file_model(cfg)
    _check_quality_text(cfg)
    _check_quantize(cfg)
    _check_bench_fits(cfg)
    memory = _memory_fit(cfg)
    apply_extras(cfg)  # after the checks: the summary names the file's own model and quantization

    work = _run_model_work(cfg, _job_spec(cfg, prompts), output_dir)
    metrics = flat_metrics(cfg, work)
    result = {
        **work["facts"],
        "model": cfg.llm.model.name,
        "quantization": cfg.llm.quantization,
        "settings": OmegaConf.to_container(cfg.llm, resolve=True),
        "bench_settings": OmegaConf.to_container(cfg.bench, resolve=True),
        "metrics": metrics,
        "metric_definitions": definitions(),
        "bench": work["bench"],
        "llama_bench": work.get("llama_bench") or [],
        "quality": work.get("quality") or {},
        "imatrix": work.get("imatrix"),
        "peak_rss_mb": work.get("peak_rss_mb"),
        "memory": _memory_report(memory, work),
        "texts": _write_texts(output_dir, work["bench"]),
    }
    if result["backend"] == "mock":
        result["note"] = (
            "MOCK backend: no model ran; texts echo the prompts, timings measure the echo"
        )
    notes = _notes(work["facts"])
    if notes:
        result["notes"] = notes
        for note in notes:
            log.warning(note)
    write_json_atomic(output_dir / "result.json", result)
    rows = rows_of(result)
    write_formats(output_dir, rows, cfg.bench.get("formats") or ())
    _log_to_tensorboard(cfg, work, metrics)
    if not _is_multirun():  # a sweep's jobs keep to their summaries; texts/ holds them all
        _print_texts(work["bench"]["prompts"], result["texts"], output_dir)
    if rows:
        print(markdown(rows), flush=True)
    print(_report_line(metrics), flush=True)
    print(f"run_dir: {output_dir}", flush=True)
    return metrics
