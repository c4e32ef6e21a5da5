"""Output quality inside the sweep: perplexity on a fixed text, and agreement with the base file.

The comparison follows llama.cpp's ``perplexity --kl-divergence``: the base (most precise file of
the same model on disk) predicts every next token of the reference text once; its
log-probabilities are cached next to the models, and each other quantization is compared with
them (top-1 agreement and mean KL divergence base‖quantized). The base's own row is the
reference, not a comparison.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.run.files import atomic_write

# Fixed, plain English prose with some code-like text: the same tokens for every run.
REFERENCE_TEXT = """\
A sweep compares the same model at several precisions. Each file is loaded once, warmed up, and
asked to continue the same prompts several times, starting from an empty cache every time. The
numbers that matter to a user are simple: how long the first token takes, how many tokens arrive
each second after that, how much memory the process holds, and whether the answers are still as
good as those of the full-precision file.
Quantization stores weights with fewer bits. Eight bits per weight is usually indistinguishable
from sixteen; four bits saves most of the memory and still answers well; two or three bits begin
to change which word the model thinks comes next. Measuring that change directly is cheaper than
reading hundreds of answers: give both files the same text, and count how often their most likely
next token is the same, and how far apart their predicted distributions are.
int main() {
    std::vector<std::thread> workers;
    for (int i = 0; i < 4; ++i) {
        workers.emplace_back([i] { std::printf("worker %d\\n", i); });
    }
    for (auto& worker : workers) {
        worker.join();
    }
    return 0;
}
The last step is to write everything down: one row per run, one file per sweep, and a picture
that puts speed against size, so the choice between them can be made at a glance.
"""


def reference_tokens(backend: LlamaCppBackend, n_tokens: int) -> list[int]:
    """The reference text's tokens, cut to ``n_tokens`` and to the context size."""
    tokens = backend.tokenize(REFERENCE_TEXT)
    return tokens[: max(2, min(n_tokens, backend.n_ctx))]


def perplexity(logprobs: np.ndarray, tokens: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``tokens[1:]``."""
    targets = np.asarray(tokens[1:])
    picked = logprobs[np.arange(len(targets)), targets].astype(np.float64)
    return float(math.exp(-picked.mean()))


def compare(logprobs: np.ndarray, base_logprobs: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean KL(base ‖ this) over the positions."""
    if logprobs.shape != base_logprobs.shape:
        raise ValueError(f"shape mismatch: {logprobs.shape} vs base {base_logprobs.shape}")
    agreement = float(np.mean(logprobs.argmax(-1) == base_logprobs.argmax(-1)))
    base = base_logprobs.astype(np.float64)
    kl = np.sum(np.exp(base) * (base - logprobs.astype(np.float64)), axis=-1)
    return {"top1_agreement": agreement, "kl_mean": float(np.mean(kl)), "kl_max": float(np.max(kl))}


def _cache_path(models_dir: Path, base_file: Path, tokens: list[int]) -> Path:
    stat = base_file.stat()
    key = hashlib.sha1(
        f"{base_file.name}|{stat.st_size}|{stat.st_mtime_ns}|".encode()
        + np.asarray(tokens, dtype=np.int32).tobytes()
    ).hexdigest()[:16]
    return models_dir / ".quality" / f"{base_file.name}.{key}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, array), binary=True)


def base_logprobs(
    base_file: Path,
    tokens: list[int],
    models_dir: Path,
    open_base: Callable[[Path], LlamaCppBackend],
) -> np.ndarray:
    """The base file's next-token log-probabilities on ``tokens``, computed once and cached."""
    cache = _cache_path(models_dir, base_file, tokens)
    if cache.is_file():
        return np.load(cache)
    with open_base(base_file) as base:
        logprobs = base.next_token_logprobs(tokens)
    _save_atomic(cache, logprobs)
    return logprobs


def evaluate_quality(
    backend: LlamaCppBackend,
    *,
    base_file: Path | None,
    base_quantization: str | None,
    models_dir: Path,
    n_tokens: int,
    open_base: Callable[[Path], LlamaCppBackend],
) -> dict[str, Any]:
    """Perplexity of ``backend``'s model, and agreement/KL against the base file when known.

    The base's own row is labelled ``reference`` and carries no agreement or KL: comparing a
    file with itself would report 1.0 and 0 as if they had been measured. Its predictions are
    cached for the other files' jobs, which compare with the base file's predictions (read from
    that cache, or computed from the base file itself).
    """
    tokens = reference_tokens(backend, n_tokens)
    logprobs = backend.next_token_logprobs(tokens)
    result: dict[str, Any] = {
        "reference_tokens": len(tokens),
        "perplexity": perplexity(logprobs, tokens),
        "base_quantization": base_quantization,
        "reference": False,
        "top1_agreement": None,
        "kl_mean": None,
        "kl_max": None,
    }
    if base_file is None:
        return result
    if base_file.resolve() == backend.model_path.resolve():
        cache = _cache_path(models_dir, base_file, tokens)
        if not cache.is_file():
            _save_atomic(cache, logprobs)
        result["reference"] = True
        return result
    reference = base_logprobs(base_file, tokens, models_dir, open_base)
    result.update(compare(logprobs, reference))
    return result


def quality_settings(spec: Mapping[str, Any]) -> tuple[bool, int]:
    """``(enabled, n_tokens)`` of a job spec's ``quality`` node."""
    quality = spec.get("quality") or {}
    return bool(quality.get("enabled", True)), int(quality.get("n_tokens", 256))
