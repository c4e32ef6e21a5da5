"""llama-bench inside the generate job: thread defaults, pp/tg tests and their statistics,
greedy without llama.cpp's sampler chain, the sampler's counters, llama-bench's output files."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from ml_engine.errors import UserError
from ml_engine.llm.backends import Sampling
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend, penalized_argmax
from ml_engine.llm.bench import llama_bench_stats, run_llama_bench
from ml_engine.llm.generate import generate
from ml_engine.llm.llama_bench_format import EXTRA_FIELDS, LLAMA_BENCH_FIELDS
from ml_engine.llm.rules import GENERATE_RULES
from ml_engine.llm.sweep_report import write_sweep_llama_bench
from ml_engine.llm.threads import physical_core_count
from ml_engine.run.rules import check_config
from tests.conftest import compose_config

# llama-bench's own header and rule of its markdown output on a CPU backend
MD_HEADER = (
    "| model                          |       size |     params | backend    | threads |"
    "            test |                  t/s |"
)
MD_RULE = (
    "| ------------------------------ | ---------: | ---------: | ---------- | ------: |"
    " --------------: | -------------------: |"
)


# ---------------------------------------------------------------------------------- threads


def test_thread_defaults_are_what_the_context_got(tiny_f32) -> None:
    with LlamaCppBackend(tiny_f32, n_ctx=64) as backend:
        facts = backend.describe()
        assert facts["n_threads"] == physical_core_count() == facts["n_threads_batch"]
    with LlamaCppBackend(tiny_f32, n_ctx=64, n_threads=2, n_threads_batch=1) as backend:
        assert (backend.describe()["n_threads"], backend.describe()["n_threads_batch"]) == (2, 1)


# ---------------------------------------------------------------------- llama-bench's tests


def test_statistics_are_llama_bench_s() -> None:
    stats = llama_bench_stats([1_000_000_000, 2_000_000_000], n_tokens=100)
    assert stats["samples_ts"] == [100.0, 50.0]
    assert stats["avg_ts"] == 75.0
    assert stats["stddev_ts"] == pytest.approx(statistics.stdev([100.0, 50.0]))
    assert stats["avg_ns"] == 1_500_000_000
    assert stats["stddev_ns"] == int(math.sqrt(5e17))  # integer arithmetic, truncated
    single = llama_bench_stats([3], n_tokens=1)
    assert single["stddev_ns"] == 0 and single["stddev_ts"] == 0.0


def test_pp_and_tg_tests_decode_what_they_say(tiny_backend) -> None:
    tests = run_llama_bench(tiny_backend, n_prompt=[32, 0, 16], n_gen=8, repetitions=2, warmup=1)
    assert [t["test"] for t in tests] == ["pp32", "pp16", "tg8"]
    for test in tests:
        assert len(test["samples_ns"]) == len(test["counters"]) == 2
        n_tokens = test["n_prompt"] + test["n_gen"]
        assert test["avg_ts"] == pytest.approx(statistics.fmean(test["samples_ts"]))
        assert test["samples_ts"][0] == pytest.approx(1e9 * n_tokens / test["samples_ns"][0])
        assert test["vs_llama_cpp"] > 0
    # llama.cpp counted the pp test's tokens as prompt evaluation, the tg test's as decodes
    assert all(c["n_p_eval"] == 32 for c in tests[0]["counters"])
    assert all(c["n_eval"] == 8 for c in tests[2]["counters"])


def test_a_test_longer_than_the_context_is_one_line(tiny_backend) -> None:
    with pytest.raises(UserError, match=r"bench.n_gen=4096 does not fit .* 512 tokens") as info:
        run_llama_bench(tiny_backend, n_prompt=0, n_gen=4096, repetitions=1, warmup=0)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------- greedy and sampled


def _chain_tokens(backend: LlamaCppBackend, prompt: str, sampling: Sampling) -> list[int]:
    """Greedy through llama.cpp's own sampler chain (penalties → greedy): the reference."""
    lib = backend._lib
    chain = backend._sampler(sampling)
    try:
        ids = backend.prompt_tokens(prompt)
        backend._clear_kv_cache()
        backend._decode_prompt(ids)
        tokens = []
        for position in range(len(ids), len(ids) + sampling.max_tokens):
            tokens.append(int(lib.llama_sampler_sample(chain, backend._ctx, -1)))
            backend._decode([tokens[-1]], position, all_logits=False)
        return tokens
    finally:
        lib.llama_sampler_free(chain)


@pytest.mark.parametrize("penalty", [1.0, 1.1, 1.5, 0.8])
def test_greedy_without_the_chain_equals_llama_cpp_s_greedy(tiny_backend, penalty) -> None:
    sampling = Sampling(
        max_tokens=48, temperature=0.0, top_k=40, top_p=0.95, repeat_penalty=penalty
    )
    ours = tiny_backend.generate("The quick brown fox", sampling)
    assert ours.tokens == _chain_tokens(tiny_backend, "The quick brown fox", sampling)
    assert ours.counters["n_sample"] == 0  # no chain ran


def _eager_penalized_argmax(logits: np.ndarray, window: list[int], penalty: np.float32) -> int:
    """The penalty on every distinct window token first, then the first maximum."""
    logits = logits.copy()
    if window:
        seen = np.array(sorted(set(window)), dtype=np.intp)
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return int(logits.argmax())


def test_the_lazy_penalty_picks_what_the_eager_one_does() -> None:
    rng = np.random.default_rng(0)
    levels = np.array([-2, -1, -0.5, 0, 0.5, 1, 1.1, 2], dtype=np.float32)  # ties, zeros
    in_window = 0
    for case in range(4000):
        n = int(rng.integers(2, 40))
        if case % 2:
            logits = levels[rng.integers(0, len(levels), n)]
        else:
            logits = rng.normal(size=n).astype(np.float32)
        window = [int(t) for t in rng.integers(0, n, int(rng.integers(0, 12)))]
        if case % 3 == 0:  # the raw maximum in the window: the lazy loop runs
            window.append(int(logits.argmax()))
        in_window += int(logits.argmax()) in window
        penalty = np.float32((0.8, 1.0, 1.1, 1.5, 3.0)[case % 5])
        expected = _eager_penalized_argmax(logits, window, penalty)
        assert penalized_argmax(logits.copy(), window, penalty) == expected, (logits, window)
    assert in_window > 1000


def test_the_repeat_penalty_changes_greedy_tokens(tiny_backend) -> None:
    # else the comparison above could not tell a missing penalty from a correct one
    plain = Sampling(max_tokens=32, temperature=0.0, top_k=40, top_p=0.95, repeat_penalty=1.0)
    penalized = Sampling(max_tokens=32, temperature=0.0, top_k=40, top_p=0.95, repeat_penalty=1.5)
    prompt = "The quick brown fox"
    assert (
        tiny_backend.generate(prompt, plain).tokens
        != tiny_backend.generate(prompt, penalized).tokens
    )


def test_sampled_generation_reads_the_chain_s_counters(tiny_backend) -> None:
    sampling = Sampling(max_tokens=8, temperature=0.8, top_k=40, top_p=0.95, seed=3)
    record = tiny_backend.generate("Hello", sampling)
    assert record.counters["n_sample"] == len(record.tokens) and record.counters["sample_ms"] > 0


# ---------------------------------------------------------------------------- the job, files


FAST_BENCH = ("bench.n_prompt=16", "bench.n_gen=[4,6]", "bench.formats=[md,csv,json,jsonl]")


def test_job_writes_llama_bench_files_with_its_field_names(gen_cfg, capsys) -> None:
    cfg = gen_cfg(["llm.quantization=f32", "prompt=Hi", "llm.temperature=0", *FAST_BENCH])
    metrics = generate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert metrics["gen/sampling"] == "greedy" and metrics["gen/vs_llama_cpp"] > 0
    assert (metrics["n_prompt"], metrics["n_gen"], metrics["n_threads"]) == (16, 4, 1)
    assert metrics["pp/avg_ts"] > 0 and metrics["tg/avg_ts"] > 0 and metrics["n_threads_batch"] == 1

    rows = json.loads((run_dir / "llama-bench.json").read_text())
    assert [r["test"] for r in rows] == ["pp16", "tg4", "tg6"]
    for row in rows:
        assert list(row)[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
        assert list(row)[-len(EXTRA_FIELDS) :] == list(EXTRA_FIELDS)
        assert len(row["samples_ns"]) == len(row["samples_ts"]) == 2
    assert rows[1]["avg_ts"] == metrics["tg/avg_ts"] and rows[0]["n_threads"] == 1
    assert rows[0]["flash_attn"] == -1  # llama-bench's enum for the requested auto
    lines = (run_dir / "llama-bench.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    table = list(csv.DictReader(io.StringIO((run_dir / "llama-bench.csv").read_text())))
    assert [r["model_type"] for r in table] == [r["model_type"] for r in rows]
    assert list(table[0])[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
    assert float(table[2]["avg_ts"]) == pytest.approx(rows[2]["avg_ts"])

    md = (run_dir / "llama-bench.md").read_text().splitlines()
    assert md[:2] == [MD_HEADER, MD_RULE]
    assert md[2].split("|")[6].strip() == "pp16" and " ± " in md[2].split("|")[7]
    assert MD_HEADER in capsys.readouterr().out  # printed after the run


def test_sweep_dir_gets_every_job_s_rows(tmp_path) -> None:
    for job, quant in (("0", "f32"), ("1", "q8_0")):
        folder = tmp_path / job
        folder.mkdir()
        test = {"test": "tg4", "n_prompt": 0, "n_gen": 4, "avg_ts": 1.0, "stddev_ts": 0.0}
        result = {"metrics": {"quantization": quant}, "llama_bench": [test]}
        (folder / "result.json").write_text(json.dumps(result))
        (folder / "llama-bench.jsonl").write_text("")
    records = [{"job": "1", "status": "ok"}, {"job": "0", "status": "ok"}, {"job": "2"}]
    paths = write_sweep_llama_bench(tmp_path, records)
    assert paths == [tmp_path / "llama-bench.jsonl"]
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert [r["quantization"] for r in rows] == ["q8_0", "f32"]  # the ranked order


@pytest.mark.parametrize(
    "override, message",
    [
        ("bench.formats=[md,xml]", "expected a list among md, csv, json, jsonl"),
        ("bench.n_prompt=-1", "bench.n_prompt=-1 is not valid"),
        ("bench.n_gen=[128,x]", "bench.n_gen="),
        ("llm.n_threads_batch=0", "llm.n_threads_batch=0 is not valid"),
    ],
)
def test_bench_settings_are_checked_before_work(override, message) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        check_config(compose_config("generate", [override]), GENERATE_RULES)


def test_defaults_are_llama_bench_s() -> None:
    cfg = compose_config("generate")
    assert (cfg.bench.n_prompt, cfg.bench.n_gen, cfg.bench.repetitions) == (512, 128, 5)
    assert cfg.llm.n_threads is None and cfg.llm.n_threads_batch is None
    assert list(cfg.bench.formats) == ["md", "jsonl"]
    assert cfg.llm.flash_attn == "auto"  # llama.cpp's and llama-bench's default (-fa auto)


@pytest.mark.parametrize(("asked", "on"), [("auto", True), (False, False), (True, True)])
def test_flash_attention_is_what_llama_cpp_chose(tiny_f32, asked, on: bool) -> None:
    """auto: llama.cpp decides (on, where the CPU backend implements it), and the facts say
    what it chose, read off its own log, beside what was asked."""
    with LlamaCppBackend(tiny_f32, n_ctx=64, flash_attn=asked) as backend:
        facts = backend.describe()
        assert facts["flash_attn"] is on
        assert facts["flash_attn_requested"] == {"auto": "auto", False: "off", True: "on"}[asked]
        # and it generates
        tokens = backend.generate("Hello", Sampling(8, 0.0, 1, 1.0, 1.0)).tokens
        assert len(tokens) == 8
