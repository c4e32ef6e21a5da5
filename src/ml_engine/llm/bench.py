"""Timing of generation, after llama.cpp's ``llama-bench``: warm up, then repetitions.

Two kinds of measurement, both from an empty KV cache every repetition (no prompt prefix is
reused), rates wall-clock:

- ``run_benchmark``: the prompts as a user sends them, generated with the configured sampling:
  time to first token, prompt and generation rates;
- ``run_llama_bench``: llama-bench's own pp and tg tests (random tokens, no sampling), with its
  statistics, so the figures compare one to one with ``llama-bench -p N -n M -r R``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ml_engine.errors import UserError
from ml_engine.llm import progress
from ml_engine.llm.backends import Generation, LlmBackend, Sampling
from ml_engine.run.helpers import is_finite_number

# llama-bench draws its random tokens with std::rand(); ours come from a fixed-seed generator,
# so every job decodes the same tokens
TOKEN_SEED = 1234


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN when there are none)."""
    finite = [v for v in values if is_finite_number(v)]
    if not finite:
        return math.nan, math.nan
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), spread


def sampling_kind(sampling: Sampling) -> str:
    return "greedy" if sampling.temperature <= 0 else "sampled"


def llama_cpp_rate(counters: dict[str, float]) -> float:
    """Generation tokens/s by llama.cpp's own counters: decodes over decode time plus the
    sampler chain's time for as many samples (its mean per sample × decodes: the chain also
    timed the first token's sample, which belongs to the TTFT). Greedy skips the chain, so its
    rate is decode time alone; our argmax is in neither."""
    n_eval, eval_ms = counters.get("n_eval", 0), counters.get("eval_ms", 0.0)
    n_sample, sample_ms = counters.get("n_sample", 0), counters.get("sample_ms", 0.0)
    per_sample = sample_ms / n_sample if n_sample else 0.0
    busy_ms = eval_ms + per_sample * n_eval
    return 1000.0 * n_eval / busy_ms if n_eval and busy_ms > 0 else math.nan


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
        "llama_cpp_tokens_per_s": llama_cpp_rate(record.counters),
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
    total = warmup + len(prompts) * repetitions
    with progress.phase("generating (warm-up + repetitions)", total, "runs") as shown:
        for _ in range(warmup):
            backend.generate(prompts[0], sampling)
            shown.advance()
        per_prompt = [_prompt_runs(backend, p, sampling, repetitions, shown) for p in prompts]
    stats = aggregate([r for p in per_prompt for r in p["repetitions"]])
    return {"prompts": per_prompt, "sampling": sampling_kind(sampling), **stats}


def _prompt_runs(
    backend: LlmBackend,
    prompt: str,
    sampling: Sampling,
    repetitions: int,
    shown: progress.Phase,
) -> dict[str, Any]:
    records = []
    for _ in range(repetitions):
        records.append(backend.generate(prompt, sampling))
        shown.advance()
    return {
        "prompt": prompt,
        "text": records[0].text,
        "finish_reason": records[0].finish_reason,
        "repetitions": [_repetition(r) for r in records],
    }


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
    stats["llama_cpp_tokens_per_s"], stats["llama_cpp_tokens_per_s_std"] = mean_std(
        [r.get("llama_cpp_tokens_per_s", math.nan) for r in reps]
    )
    ours, theirs = stats["gen_tokens_per_s"], stats["llama_cpp_tokens_per_s"]
    stats["vs_llama_cpp"] = ours / theirs if is_finite_number(theirs) and theirs > 0 else None
    stats["prompt_tokens"] = sum(r["prompt_tokens"] for r in reps)
    stats["completion_tokens"] = sum(r["completion_tokens"] for r in reps)
    return stats


# ------------------------------------------------------------------------- llama-bench's tests


def as_sizes(value: int | Iterable[int] | None) -> list[int]:
    """``bench.n_prompt`` / ``bench.n_gen``: an int or a list; 0 entries are no test."""
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value)
    return [int(v) for v in values if int(v) > 0]


def test_name(n_prompt: int, n_gen: int) -> str:
    """llama-bench's label: pp512, tg128, pp512+tg128."""
    if n_prompt and not n_gen:
        return f"pp{n_prompt}"
    if n_gen and not n_prompt:
        return f"tg{n_gen}"
    return f"pp{n_prompt}+tg{n_gen}"


def llama_bench_stats(samples_ns: Sequence[int], n_tokens: int) -> dict[str, Any]:
    """avg/stddev of the samples in ns (integer arithmetic, as llama-bench's templates on
    uint64) and in tokens/s (each sample's n_tokens / seconds, then their mean and sample
    stddev, in doubles)."""
    samples_ts = [1e9 * n_tokens / ns for ns in samples_ns]
    return {
        "avg_ns": _avg_int(samples_ns),
        "stddev_ns": _stdev_int(samples_ns),
        "avg_ts": _avg_float(samples_ts),
        "stddev_ts": _stdev_float(samples_ts),
        "samples_ns": list(samples_ns),
        "samples_ts": samples_ts,
    }


def _avg_int(values: Sequence[int]) -> int:
    return sum(values) // len(values) if values else 0


def _stdev_int(values: Sequence[int]) -> int:
    n = len(values)
    if n <= 1:
        return 0
    mean = _avg_int(values)
    variance = sum(v * v for v in values) // (n - 1) - mean * mean * n // (n - 1)
    return int(math.sqrt(max(variance, 0)))


def _avg_float(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _stdev_float(values: Sequence[float]) -> float:
    n = len(values)
    if n <= 1:
        return 0.0
    mean = _avg_float(values)
    variance = sum(v * v for v in values) / (n - 1) - mean * mean * n / (n - 1)
    return math.sqrt(max(variance, 0.0))


def bench_tokens(backend: Any, n: int, rng: np.random.Generator) -> list[int]:
    """llama-bench's input: BOS first when the vocabulary adds one, then random ids."""
    tokens = rng.integers(0, backend.n_vocab, size=n).tolist()
    if backend.add_bos and tokens:
        tokens[0] = backend.bos
    return tokens


def check_fits(n_prompt: Sequence[int], n_gen: Sequence[int], n_ctx: int, requested: int) -> None:
    """Each test runs from an empty cache, so each size alone must fit the context."""
    for key, sizes in (("n_prompt", n_prompt), ("n_gen", n_gen)):
        too_big = [n for n in sizes if n > n_ctx]
        if too_big:
            raise UserError(
                f"bench.{key}={too_big[0]} does not fit in the context of {n_ctx} tokens "
                f"(llm.n_ctx={requested}); raise llm.n_ctx or lower bench.{key}"
            )


def _one_test(
    backend: Any, n_prompt: int, n_gen: int, reps: int, warmup: int, rng: np.random.Generator
) -> dict[str, Any]:
    """One llama-bench test: warm-up (pp: the whole prompt; tg: one token, as llama-bench),
    then ``reps`` timed runs, each from an empty cache, with llama.cpp's counters of each."""
    run = backend.bench_prompt if n_prompt else backend.bench_gen
    n_tokens = n_prompt or n_gen
    for _ in range(warmup):
        backend.reset_for_bench()
        run(bench_tokens(backend, n_tokens if n_prompt else 1, rng))
    test_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    samples_ns, counters = [], []
    for _ in range(reps):
        tokens = bench_tokens(backend, n_tokens, rng)  # drawn before the clock starts
        backend.reset_for_bench()
        started = time.perf_counter_ns()
        run(tokens)
        samples_ns.append(time.perf_counter_ns() - started)
        counters.append(backend.perf_counters())
    # llama.cpp counts a multi-token decode as prompt evaluation, a single-token one as eval
    key_n, key_ms = ("n_p_eval", "p_eval_ms") if n_prompt else ("n_eval", "eval_ms")
    counter_ts = [1000.0 * c[key_n] / c[key_ms] if c[key_ms] > 0 else math.nan for c in counters]
    stats = llama_bench_stats(samples_ns, n_tokens)
    counter_avg = _avg_float(counter_ts)
    return {
        "test": test_name(n_prompt, n_gen),
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": 0,
        "test_time": test_time,
        **stats,
        "counters": counters,
        "llama_cpp_samples_ts": counter_ts,
        "llama_cpp_avg_ts": counter_avg,
        "llama_cpp_stddev_ts": _stdev_float(counter_ts),
        "vs_llama_cpp": stats["avg_ts"] / counter_avg if counter_avg > 0 else None,
    }


def run_llama_bench(
    backend: Any,
    *,
    n_prompt: int | Iterable[int] | None,
    n_gen: int | Iterable[int] | None,
    repetitions: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """llama-bench's pp tests (one per n_prompt), then its tg tests (one per n_gen)."""
    prompts, gens = as_sizes(n_prompt), as_sizes(n_gen)
    check_fits(prompts, gens, backend.n_ctx, getattr(backend, "n_ctx_requested", backend.n_ctx))
    rng = np.random.default_rng(TOKEN_SEED)
    sizes = [(n, 0) for n in prompts] + [(0, n) for n in gens]
    names = ", ".join(test_name(p, g) for p, g in sizes)
    with progress.phase(f"llama-bench tests ({names})", len(sizes), "tests") as shown:
        tests = []
        for n_p, n_g in sizes:
            tests.append(_one_test(backend, n_p, n_g, repetitions, warmup, rng))
            shown.advance()
    return tests


def first_tests(tests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row's view: the first pp and the first tg test (``avg_ts`` with ``avg_ts_std``)."""
    view: dict[str, Any] = {}
    pp = next((t for t in tests if t["n_prompt"] and not t["n_gen"]), None)
    tg = next((t for t in tests if t["n_gen"] and not t["n_prompt"]), None)
    for kind, key, test in (("pp", "n_prompt", pp), ("tg", "n_gen", tg)):
        if test is not None:
            view[kind] = {"avg_ts": test["avg_ts"], "avg_ts_std": test["stddev_ts"]}
            view[key] = test[key]
    return view
