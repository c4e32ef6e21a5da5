"""Generation rate as reported by the sweep vs llama.cpp's own decode counters, in the same run.

    python bench/llm_overhead.py [--threads 2] [--tokens 64] [--reps 5]

Two models written by the project's own GGUF writer and quantized to q4_k_m: the default tiny
model (≈1.6M parameters) and a ≈111M-parameter one. For each, the ratio

    reported wall-clock generation tokens/s  ÷  llama.cpp decode-counter tokens/s

is measured per repetition of the same generation, next to the same ratio for
``llama_cpp.Llama.create_completion`` as the baseline. Targets: ≥ 0.95 on the large model and
≥ 0.85 on the tiny one. Model files are cached under models/ (git-ignored).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from omegaconf import OmegaConf

from ml_engine.llm.backends import Sampling
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.models import ensure_model_file
from ml_engine.run.locations import CONFIG_DIR, PROJECT_ROOT

PROMPT = "Write a C++ thread example"
# ≈111M parameters, every width a multiple of 256 so q4_k_m applies to all matrices
LARGE_SHAPE = dict(n_vocab=4096, n_embd=1024, n_ff=2816, n_layer=8, n_head=16, n_head_kv=16)


def model_file(models_dir: Path, shape: dict[str, int] | None) -> tuple[Path, int]:
    cfg = OmegaConf.load(CONFIG_DIR / "llm" / "model" / "tiny.yaml")
    if shape:
        cfg.shape.update(shape)
        cfg.base_quantization = "f16"  # half the bytes of f32 to write; quantized from it
    resolved = ensure_model_file(cfg, "q4_k_m", models_dir)
    with LlamaCppBackend(resolved.path, n_ctx=256, n_threads=1) as backend:
        return resolved.path, backend.describe()["n_params"]


def ours(path: Path, threads: int, tokens: int, reps: int) -> list[float]:
    """Per repetition: our wall-clock generation rate ÷ llama.cpp's decode counter rate."""
    sampling = Sampling(max_tokens=tokens, temperature=0.8, top_k=40, top_p=0.95, seed=1)
    with LlamaCppBackend(path, n_ctx=512, n_threads=threads, ignore_eos=True) as backend:
        backend.generate(PROMPT, sampling)  # warm-up
        ratios = []
        for _ in range(reps):
            record = backend.generate(PROMPT, sampling)
            ratios.append(record.gen_tokens_per_s / record.counters["eval_tokens_per_s"])
        return ratios, record.counters["eval_tokens_per_s"]


def baseline(path: Path, threads: int, tokens: int, reps: int) -> list[float]:
    """The same ratio for ``Llama.create_completion``: wall time minus its prompt evaluation."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    ctx = llm._ctx.ctx
    ratios = []
    for rep in range(reps + 1):
        llm.reset()
        llama_cpp.llama_perf_context_reset(ctx)
        started = time.perf_counter()
        llm.create_completion(
            PROMPT, max_tokens=tokens, temperature=0.8, top_k=40, top_p=0.95, seed=1
        )
        wall = time.perf_counter() - started
        perf = llama_cpp.llama_perf_context(ctx)
        if rep == 0 or perf.n_eval == 0:
            continue  # warm-up
        wall_rate = perf.n_eval / (wall - perf.t_p_eval_ms / 1000)
        ratios.append(wall_rate / (1000 * perf.n_eval / perf.t_eval_ms))
    llm.close()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models-dir", type=Path, default=PROJECT_ROOT / "models")
    args = parser.parse_args()

    print(
        f"threads={args.threads} tg{args.tokens} reps={args.reps} (q4_k_m, ratios per repetition)"
    )
    print(
        "| model | params | decode counters tok/s | ours ÷ counters | create_completion ÷ "
        "counters | target |"
    )
    print("|---|---|---|---|---|---|")
    for label, shape, target in (("tiny", None, 0.85), ("large", LARGE_SHAPE, 0.95)):
        path, n_params = model_file(args.models_dir, shape)
        ratios, counter_rate = ours(path, args.threads, args.tokens, args.reps)
        base = baseline(path, args.threads, args.tokens, args.reps)
        mine = statistics.median(ratios)
        print(
            f"| {label} | {n_params / 1e6:.1f}M | {counter_rate:.0f} | {mine:.3f} "
            f"(min {min(ratios):.3f}) | {statistics.median(base):.3f} | ≥ {target} "
            f"{'met' if mine >= target else 'NOT met'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
