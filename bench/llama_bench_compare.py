"""Our llama-bench tests and generation vs llama.cpp's own counters, and vs llama-bench itself.

    python bench/llama_bench_compare.py [--threads N] [-p 512] [-n 128] [-r 5]
    python bench/llama_bench_compare.py --build                  # also run llama-bench (built once)
    python bench/llama_bench_compare.py --llama-bench PATH       # also run that llama-bench
    python bench/llama_bench_compare.py --build --rounds 5       # median over alternating rounds

On the ≈111M-parameter model of bench/llm_overhead.py (`--shape vocab262k`: a 262,144-token
vocabulary on a small transformer, ≈318M parameters; written by the project's GGUF writer,
quantized to q4_k_m, cached under models/), in one process:

- pp and tg tests as every generate job runs them (llm/bench.py ``run_llama_bench``): our
  wall-clock avg_ts ÷ llama.cpp's prompt-eval / decode counters of the same repetitions;
- greedy generation (argmax without the sampler chain): its wall-clock tok/s ÷ our tg avg_ts,
  and ÷ llama.cpp's decode counters;
- sampled generation (llama.cpp's chain): wall-clock tok/s ÷ (decode + sampler counters).

With llama-bench, the same file with the same -p/-n/-r/-t/-b/-ub, ``-o json``: our pp and tg
avg_ts ÷ llama-bench's, and greedy generation ÷ llama-bench's tg, both its default (an empty
KV cache) and at ``-d`` = the prompt's token count (the context generation decodes in).
Targets: ≥ 0.95 each.
Threads default to the physical cores, as llama-bench's -t and the generate job's default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import ROOT

# OMP_WAIT_POLICY as the user has it (unset: libgomp's default), on both sides, as the
# generate job's model worker and llama-bench run
from llm_overhead import LARGE_SHAPE, PROMPT, model_file

from ml_engine.llm.backends import Sampling
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.bench import run_benchmark, run_llama_bench
from ml_engine.llm.threads import physical_core_count

TARGET = 0.95
N_BATCH = 512
SHAPES = {
    "large": LARGE_SHAPE,
    # a 262,144-token vocabulary (as Gemma 3's) on a small transformer: the output layer and
    # the per-token work over the logits dominate, as on the 268M Gemma of issue 10
    "vocab262k": dict(n_vocab=262144, n_embd=512, n_ff=2048, n_layer=12, n_head=8, n_head_kv=2),
}


def ours(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Our pp/tg tests and greedy and sampled generation of n_gen tokens, one backend."""
    n_ctx = max(args.n_prompt, args.n_gen + 64) + 64
    with LlamaCppBackend(
        path, n_ctx=n_ctx, n_threads=args.threads, n_batch=N_BATCH, ignore_eos=True
    ) as backend:
        tests = run_llama_bench(
            backend, n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.reps, warmup=1
        )
        greedy = Sampling(max_tokens=args.n_gen + 1, temperature=0.0, top_k=40, top_p=0.95)
        sampled = Sampling(max_tokens=args.n_gen + 1, temperature=0.8, top_k=40, top_p=0.95, seed=1)
        runs = {
            kind: run_benchmark(backend, [PROMPT], s, warmup=1, repetitions=args.reps)
            for kind, s in (("greedy", greedy), ("sampled", sampled))
        }
        depth = len(backend.prompt_tokens(PROMPT))  # where generation's first decode starts
        return {
            "pp": tests[0],
            "tg": tests[1],
            **runs,
            "n_threads": backend.n_threads,
            "depth": depth,
        }


def llama_bench(
    binary: Path, path: Path, args: argparse.Namespace, threads: int, depth: int
) -> dict:
    """llama-bench's pp and tg rows for the same file and settings (its -o json), and its tg
    at ``-d depth``: generation starts after the prompt's tokens are in the KV cache, and each
    decode attends to them too (on the 111M model a 16-token prompt costs ~5 % of tg)."""

    def rows(*test: str) -> list[dict]:
        command = [
            str(binary), "-m", str(path), *test, "-r", str(args.reps), "-t", str(threads),
            "-b", str(N_BATCH), "-ub", str(N_BATCH), "-o", "json",
        ]  # fmt: skip
        print("$ " + " ".join(command), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    default = rows("-p", str(args.n_prompt), "-n", str(args.n_gen))
    at_depth = rows("-p", "0", "-n", str(args.n_gen), "-d", str(depth))
    return {
        "pp": next(r for r in default if r["n_prompt"] and not r["n_gen"]),
        "tg": next(r for r in default if r["n_gen"] and not r["n_prompt"]),
        "tg_depth": at_depth[0],
    }


def built_llama_bench() -> Path:
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "build-llama-bench")], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"bench/build-llama-bench failed: {done.stderr.strip().splitlines()[-1:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _line(label: str, ratio: float | None, target: float | None = TARGET) -> str:
    text = f"{ratio:.3f}" if ratio is not None else "n/a"
    verdict = "" if target is None or ratio is None else (" met" if ratio >= target else " NOT met")
    return f"| {label} | {text} | {'≥ ' + str(target) if target else ''}{verdict} |"


def report(mine: dict[str, Any], theirs: dict[str, Any] | None) -> list[str]:
    pp, tg, greedy, sampled = mine["pp"], mine["tg"], mine["greedy"], mine["sampled"]
    lines = [
        f"pp{pp['n_prompt']} ours {pp['avg_ts']:.2f} ± {pp['stddev_ts']:.2f} t/s, llama.cpp "
        f"prompt-eval counters {pp['llama_cpp_avg_ts']:.2f} t/s",
        f"tg{tg['n_gen']} ours {tg['avg_ts']:.2f} ± {tg['stddev_ts']:.2f} t/s, llama.cpp decode "
        f"counters {tg['llama_cpp_avg_ts']:.2f} t/s",
        f"greedy generation {greedy['gen_tokens_per_s']:.2f} ± "
        f"{greedy['gen_tokens_per_s_std']:.2f} t/s; sampled {sampled['gen_tokens_per_s']:.2f} ± "
        f"{sampled['gen_tokens_per_s_std']:.2f} t/s (decode+sampler counters "
        f"{sampled['llama_cpp_tokens_per_s']:.2f} t/s)",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
        _line("ours pp avg_ts ÷ llama.cpp prompt-eval counters", pp["vs_llama_cpp"]),
        _line("ours tg avg_ts ÷ llama.cpp decode counters", tg["vs_llama_cpp"]),
        _line("greedy generation ÷ ours tg avg_ts", greedy["gen_tokens_per_s"] / tg["avg_ts"]),
        _line("greedy generation ÷ llama.cpp decode counters", greedy["vs_llama_cpp"], None),
        _line("sampled generation ÷ (decode + sampler counters)", sampled["vs_llama_cpp"]),
    ]
    if theirs is not None:
        lines[3:3] = [
            f"llama-bench pp{theirs['pp']['n_prompt']} {theirs['pp']['avg_ts']:.2f} ± "
            f"{theirs['pp']['stddev_ts']:.2f} t/s, tg{theirs['tg']['n_gen']} "
            f"{theirs['tg']['avg_ts']:.2f} ± {theirs['tg']['stddev_ts']:.2f} t/s "
            f"(build {theirs['tg']['build_commit']} ({theirs['tg']['build_number']})), "
            f"tg{theirs['tg_depth']['n_gen']} @ d{theirs['tg_depth']['n_depth']} "
            f"{theirs['tg_depth']['avg_ts']:.2f} ± {theirs['tg_depth']['stddev_ts']:.2f} t/s"
        ]
        lines += [
            _line("ours pp ÷ llama-bench pp", pp["avg_ts"] / theirs["pp"]["avg_ts"]),
            _line("ours tg ÷ llama-bench tg", tg["avg_ts"] / theirs["tg"]["avg_ts"]),
            _line(
                "greedy generation ÷ llama-bench tg",
                greedy["gen_tokens_per_s"] / theirs["tg"]["avg_ts"],
            ),
            _line(
                f"greedy generation ÷ llama-bench tg @ d{mine['depth']} (same context)",
                greedy["gen_tokens_per_s"] / theirs["tg_depth"]["avg_ts"],
            ),
            _line(
                f"sampled generation ÷ llama-bench tg @ d{mine['depth']}",
                sampled["gen_tokens_per_s"] / theirs["tg_depth"]["avg_ts"],
                None,
            ),
        ]
    return lines


def cross_ratios(mine: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict:
    """Ours ÷ llama-bench for one round, llama-bench run just before and just after ours and
    averaged: a linear drift of the machine's speed between the two then cancels."""

    def theirs(test: str) -> float:
        return (before[test]["avg_ts"] + after[test]["avg_ts"]) / 2

    return {
        "ours pp ÷ llama-bench pp": mine["pp"]["avg_ts"] / theirs("pp"),
        "ours tg ÷ llama-bench tg": mine["tg"]["avg_ts"] / theirs("tg"),
        "greedy generation ÷ llama-bench tg": mine["greedy"]["gen_tokens_per_s"] / theirs("tg"),
        f"greedy generation ÷ llama-bench tg @ d{mine['depth']}": mine["greedy"]["gen_tokens_per_s"]
        / theirs("tg_depth"),
    }


def rounds_report(per_round: list[dict[str, float]]) -> list[str]:
    """The median over alternating rounds, with their range: two processes measured at
    different moments of a shared machine differ by its load, which the median damps."""
    import statistics

    lines = [f"over {len(per_round)} rounds (ours, between two llama-bench runs):", ""]
    lines += ["| ratio | median | rounds | target |", "|---|---|---|---|"]
    for label in per_round[0]:
        values = [r[label] for r in per_round]
        median = statistics.median(values)
        shown = ", ".join(f"{v:.3f}" for v in values)
        verdict = "met" if median >= TARGET else "NOT met"
        lines.append(f"| {label} | {median:.3f} | {shown} | ≥ {TARGET} {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-r", "--reps", type=int, default=5)
    parser.add_argument("--llama-bench", type=Path, default=None, help="a llama-bench binary")
    parser.add_argument("--build", action="store_true", help="build llama-bench (once) and run it")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds with llama-bench")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="large")
    args = parser.parse_args()

    binary = built_llama_bench() if args.build else args.llama_bench
    path, n_params = model_file(args.models_dir, SHAPES[args.shape])
    threads = args.threads or physical_core_count()
    print(
        f"{path.name}: {n_params / 1e6:.1f}M params, q4_k_m, threads={threads}, "
        f"-p {args.n_prompt} -n {args.n_gen} -r {args.reps}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        flush=True,
    )
    settings = argparse.Namespace(**{**vars(args), "threads": threads})
    mine = ours(path, settings)
    if binary is None:
        print("\n".join(report(mine, None)), flush=True)
        return
    theirs = llama_bench(binary, path, args, threads, mine["depth"])
    print("\n".join(report(mine, theirs)), flush=True)
    per_round = []
    for _ in range(args.rounds):
        mine = ours(path, settings)
        after = llama_bench(binary, path, args, threads, mine["depth"])
        per_round.append(cross_ratios(mine, theirs, after))
        theirs = after
    print("\n" + "\n".join(rounds_report(per_round)), flush=True)


if __name__ == "__main__":
    main()
