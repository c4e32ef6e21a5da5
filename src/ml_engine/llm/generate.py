"""Generation: validate → model work (isolated) → result.json, texts, TensorBoard → metrics."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml_engine.errors import UserError
from ml_engine.llm.backends import BACKENDS
from ml_engine.llm.isolation import call_target, run_isolated
from ml_engine.llm.quantize import quantization_names
from ml_engine.llm.tensorboard_log import log_run
from ml_engine.run.files import write_json_atomic, write_text_atomic
from ml_engine.run.rules import (
    Rule,
    check_config,
    int_at_least,
    non_negative_number,
    one_of,
    optional,
    positive_number,
)

log = logging.getLogger(__name__)

MEASURE = "ml_engine.llm.measure:measure_job"

GENERATE_RULES: tuple[Rule, ...] = (
    one_of("llm.backend.name", BACKENDS),
    one_of("llm.quantization", quantization_names()),
    int_at_least("llm.n_gpu_layers", -1),
    int_at_least("llm.n_ctx", 16),
    optional(int_at_least("llm.n_threads", 1)),
    int_at_least("llm.n_batch", 1),
    one_of("llm.flash_attn", (True, False)),
    int_at_least("llm.max_tokens", 1),
    non_negative_number("llm.temperature"),
    int_at_least("llm.top_k", 0),
    Rule("llm.top_p", lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
    positive_number("llm.repeat_penalty"),
    optional(int_at_least("llm.seed", 0)),
    int_at_least("bench.warmup", 0),
    int_at_least("bench.repetitions", 1),
    int_at_least("quality.n_tokens", 2),
    positive_number("worker.timeout_s"),
)


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


def _job_spec(cfg: DictConfig, prompts: list[str]) -> dict[str, Any]:
    return {
        "llm": OmegaConf.to_container(cfg.llm, resolve=True),
        "prompts": prompts,
        "bench": OmegaConf.to_container(cfg.bench, resolve=True),
        "quality": OmegaConf.to_container(cfg.quality, resolve=True),
        "models_dir": str(Path(cfg.paths.models_dir).resolve()),
    }


def _run_model_work(cfg: DictConfig, spec: dict[str, Any], output_dir: Path) -> dict[str, Any]:
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
    """The job's one-row view: what summary tables, sweepers and HParams read."""
    facts, bench, quality = work["facts"], work["bench"], work.get("quality") or {}
    size = facts.get("file_size_bytes")
    return {
        "model": cfg.llm.model.name,
        "backend": facts["backend"],
        "quantization": cfg.llm.quantization,
        "n_gpu_layers": cfg.llm.n_gpu_layers,
        "n_gpu_layers_effective": facts.get("n_gpu_layers_effective"),
        "compute_backend": facts.get("compute_backend"),
        "gpu_offload_supported": facts.get("gpu_offload_supported"),
        "n_threads": facts.get("n_threads"),
        "n_ctx": facts.get("n_ctx"),
        "file_mb": round(size / 1e6, 3) if size else None,
        "n_params": facts.get("n_params"),
        "load_s": facts.get("load_s"),
        "prompt_tokens": bench["prompt_tokens"],
        "completion_tokens": bench["completion_tokens"],
        "prompt/tokens_per_s": bench["prompt_tokens_per_s"],
        "prompt/tokens_per_s_std": bench["prompt_tokens_per_s_std"],
        "gen/tokens_per_s": bench["gen_tokens_per_s"],
        "gen/tokens_per_s_std": bench["gen_tokens_per_s_std"],
        # how many measurements the means and stds above rest on (prompts × repetitions)
        "n_repetitions": bench.get("n_repetitions"),
        "gen/decode_counter_tokens_per_s": bench["decode_counter_tokens_per_s"],
        "ttft_s": bench["ttft_s"],
        "ttft_s_std": bench["ttft_s_std"],
        "peak_rss_mb": work.get("peak_rss_mb"),
        "work_s": work.get("work_s"),
        "quality/perplexity": quality.get("perplexity"),
        "quality/top1_agreement": quality.get("top1_agreement"),
        "quality/kl_mean": quality.get("kl_mean"),
    }


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
    per_step = [
        {
            "gen/tokens_per_s": r["gen_tokens_per_s"],
            "prompt/tokens_per_s": r["prompt_tokens_per_s"],
            "ttft_s": r["ttft_s"],
            "gen/decode_counter_tokens_per_s": r["counters"].get("eval_tokens_per_s", math.nan),
        }
        for r in reps
    ]
    hparams = {key: cfg.llm.get(key) for key in _HPARAM_KEYS}
    hparams.update(
        model=cfg.llm.model.name, backend=cfg.llm.backend.name, repetitions=cfg.bench.repetitions
    )
    final = {
        k: v for k, v in metrics.items() if "/" in k or k in ("ttft_s", "peak_rss_mb", "file_mb")
    }
    log_run(
        OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None,
        per_step,
        hparams,
        final,
    )


def _print_config(cfg: DictConfig) -> None:
    import rich
    import rich.syntax

    shown = OmegaConf.to_container(cfg, resolve=False)
    shown.pop("hydra", None)
    rich.print(rich.syntax.Syntax(OmegaConf.to_yaml(shown), "yaml"))


def _report_line(metrics: dict[str, Any]) -> str:
    def number(key: str, digits: int = 1) -> str:
        value = metrics.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"

    if metrics["backend"] == "mock":
        return f"MOCK echo backend (no model): {metrics['completion_tokens']} words echoed"
    return (
        f"{metrics['model']} {metrics['quantization']} ngl={metrics['n_gpu_layers']} "
        f"({metrics['backend']}, {metrics['compute_backend']}): "
        f"gen {number('gen/tokens_per_s')} ± {number('gen/tokens_per_s_std')} tok/s, "
        f"prompt {number('prompt/tokens_per_s')} tok/s, ttft {number('ttft_s', 4)} s, "
        f"peak {number('peak_rss_mb')} MB, perplexity {number('quality/perplexity', 2)}"
    )


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Benchmark generation for the configured model and settings; returns the flat metrics.

    Writes ``result.json`` (everything measured), ``texts/NN.txt`` (one per prompt) and the
    configured loggers' files into the run dir.
    """
    check_config(cfg, GENERATE_RULES)
    prompts = selected_prompts(cfg)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        _print_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    work = _run_model_work(cfg, _job_spec(cfg, prompts), output_dir)
    metrics = flat_metrics(cfg, work)
    result = {
        **work["facts"],
        "model": cfg.llm.model.name,
        "quantization": cfg.llm.quantization,
        "settings": OmegaConf.to_container(cfg.llm, resolve=True),
        "bench_settings": OmegaConf.to_container(cfg.bench, resolve=True),
        "metrics": metrics,
        "bench": work["bench"],
        "quality": work.get("quality") or {},
        "peak_rss_mb": work.get("peak_rss_mb"),
        "texts": _write_texts(output_dir, work["bench"]),
    }
    if result["backend"] == "mock":
        result["note"] = (
            "MOCK backend: no model ran; texts echo the prompts, timings measure the echo"
        )
    write_json_atomic(output_dir / "result.json", result)
    _log_to_tensorboard(cfg, work, metrics)
    print(_report_line(metrics), flush=True)
    print(f"run_dir: {output_dir}", flush=True)
    return metrics
