"""The generate task's config rules, checked once per job by the entrypoint before any work.

Every list of accepted names comes from the Python list that owns it (backends, quantizations,
metrics), so a config can only name what the code knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ml_engine.llm.backends import BACKENDS
from ml_engine.llm.llama_bench_format import FORMATS
from ml_engine.llm.metrics import metric_names
from ml_engine.llm.quantize import quantization_names
from ml_engine.llm.variants import quantize_rules
from ml_engine.run.rules import (
    Rule,
    int_at_least,
    non_negative_number,
    one_of,
    optional,
    positive_number,
)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _sizes(value: Any) -> bool:
    """An int ≥ 0 or a non-empty list of them (llama-bench's -p 512 / -p 128,512)."""
    if _is_count(value):
        return True
    is_list = isinstance(value, Sequence) and not isinstance(value, str)
    return is_list and bool(value) and all(_is_count(v) for v in value)


def _formats(value: Any) -> bool:
    is_list = isinstance(value, Sequence) and not isinstance(value, str)
    return is_list and all(f in FORMATS for f in value)


def _quantization_list(value: Any) -> bool:
    names = quantization_names()
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(q in names for q in value)
    )


GENERATE_RULES: tuple[Rule, ...] = (
    one_of("llm.backend.name", BACKENDS),
    # null only until the job fills in the model's default (a given file's own)
    optional(one_of("llm.quantization", quantization_names())),
    optional(Rule("llm.model.path", lambda v: isinstance(v, str) and bool(v), "a file path")),
    one_of("llm.allow_requantize", (True, False)),
    # the quantizations a model's repository publishes, as its config lists them
    optional(
        Rule(
            "llm.model.downloadable",
            _quantization_list,
            "a list of quantizations among " + ", ".join(quantization_names()),
        )
    ),
    int_at_least("llm.n_gpu_layers", -1),
    int_at_least("llm.n_ctx", 16),
    optional(int_at_least("llm.n_threads", 1)),
    optional(int_at_least("llm.n_threads_batch", 1)),
    int_at_least("llm.n_batch", 1),
    one_of("llm.flash_attn", ("auto", True, False)),
    int_at_least("llm.max_tokens", 1),
    non_negative_number("llm.temperature"),
    int_at_least("llm.top_k", 0),
    Rule("llm.top_p", lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
    positive_number("llm.repeat_penalty"),
    optional(int_at_least("llm.seed", 0)),
    int_at_least("bench.warmup", 0),
    int_at_least("bench.repetitions", 1),
    Rule("bench.n_prompt", _sizes, "an integer ≥ 0 or a list of them"),
    Rule("bench.n_gen", _sizes, "an integer ≥ 0 or a list of them"),
    Rule("bench.formats", _formats, "a list among " + ", ".join(FORMATS)),
    one_of("bench.cache", (True, False)),
    optional(Rule("quality.text_path", lambda v: isinstance(v, str) and bool(v), "a file path")),
    int_at_least("quality.n_ctx", 8),
    optional(int_at_least("quality.n_chunks", 1)),
    positive_number("quality.max_cache_mb"),
    positive_number("worker.timeout_s"),
    # what a sweeper optimizes must be a field every job's row has
    optional(one_of("optimized_metric", metric_names())),
    *quantize_rules(),
)
