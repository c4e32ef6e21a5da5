"""Timing of generation, after llama.cpp's ``llama-bench``: warm up, then repetitions.

Every repetition starts from an empty KV cache (``LlmBackend.generate`` clears it), so no
prompt prefix is reused. Rates are wall-clock: tokens over the time of their phase.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ml_engine.llm.backends import Generation, LlmBackend, Sampling
from ml_engine.run.helpers import is_finite_number


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN when there are none)."""
    finite = [v for v in values if is_finite_number(v)]
    if not finite:
        return math.nan, math.nan
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), spread


def _repetition(record: Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": len(record.tokens),
        "n_decoded": record.n_decoded,
        "finish_reason": record.finish_reason,
        "prompt_eval_s": record.prompt_eval_s,
        "prompt_tokens_per_s": record.prompt_tokens_per_s,
        "ttft_s": record.ttft_s,
        "gen_s": record.gen_s,
        "gen_tokens_per_s": record.gen_tokens_per_s,
        "counters": record.counters,
    }


def run_benchmark(
    backend: LlmBackend,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    warmup: int,
    repetitions: int,
) -> dict[str, Any]:
    """Warm up ``warmup`` times, then run every prompt ``repetitions`` times; aggregate rates."""
    for _ in range(warmup):
        backend.generate(prompts[0], sampling)
    per_prompt = []
    for prompt in prompts:
        records = [backend.generate(prompt, sampling) for _ in range(repetitions)]
        per_prompt.append(
            {
                "prompt": prompt,
                "text": records[0].text,
                "finish_reason": records[0].finish_reason,
                "repetitions": [_repetition(r) for r in records],
            }
        )
    return {"prompts": per_prompt, **aggregate([r for p in per_prompt for r in p["repetitions"]])}


def aggregate(reps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over all repetitions of all prompts."""
    stats: dict[str, Any] = {"n_repetitions": len(reps)}
    for key in ("gen_tokens_per_s", "prompt_tokens_per_s", "ttft_s", "prompt_eval_s", "gen_s"):
        stats[key], stats[f"{key}_std"] = mean_std([r[key] for r in reps])
    counter_rates = [
        r["counters"].get("eval_tokens_per_s", math.nan) for r in reps if r["counters"]
    ]
    stats["decode_counter_tokens_per_s"], stats["decode_counter_tokens_per_s_std"] = mean_std(
        counter_rates
    )
    stats["prompt_tokens"] = sum(r["prompt_tokens"] for r in reps)
    stats["completion_tokens"] = sum(r["completion_tokens"] for r in reps)
    return stats
