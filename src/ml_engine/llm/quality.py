"""Output quality inside the sweep, measured the way ``llama-perplexity --kl-divergence`` does.

The quality text (built in, or ``quality.text_path``) is tokenized once (with BOS first when the
model adds one) and cut into chunks of ``quality.n_ctx`` tokens, at most ``quality.n_chunks`` of
them. Each chunk is decoded from an empty KV cache with BOS at its first position (when the model
adds BOS), and its second half is scored: the predictions at positions ``n_ctx/2 … n_ctx-2`` of
the tokens after them. The base (the model's most precise file on disk) scores every chunk once;
its log-probabilities over the whole vocabulary are cached next to the models, and every other
file is compared with them position by position (``llm.kld``). The base's own row is the
reference: its perplexity is measured, its comparisons are empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_engine.errors import UserError
from ml_engine.llm import progress
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.kld import (
    PositionScores,
    kl_statistics,
    own_scores,
    perplexity_of,
    score_positions,
)
from ml_engine.run.files import atomic_path

BUILT_IN = "built-in"

# Fixed, plain English prose with some code: the same tokens for every run. Long enough for a
# few 128-token chunks under a 32k-token vocabulary (and many under a character vocabulary).
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
A distribution is a list of chances, one for every token the model knows. When the full file
gives the next word a chance of one half and the small file gives it a chance of one third, the
difference is visible in a single number per position, and the average over a few hundred
positions says more than any one answer read by eye. The largest differences matter as well:
a file that is right on average but badly wrong once in a hundred tokens will, sooner or later,
write a sentence that the full file would never have written.
def mean_and_spread(values):
    total = sum(values)
    mean = total / len(values)
    squares = sum((v - mean) ** 2 for v in values)
    return mean, (squares / (len(values) - 1)) ** 0.5
Speed is measured on the machine that will run the model, because memory bandwidth, the number
of cores and the graphics card decide it far more than the file format alone. A file twice as
small is often nearly twice as fast on a laptop and hardly faster on a large server. Memory is
measured at its peak, since that is what decides whether a model fits at all. Time to the first
token depends on the length of the prompt; the rate after it depends on the length of the answer.
Written down together, these figures let a team pick one file, explain the choice in a sentence,
and check it again when a new model, a new machine or a new version of the library arrives.
"""

# chunks decoded per file: llama-perplexity's --chunks; null in the config: as many as fit
DEFAULT_N_CTX = 128
DEFAULT_N_CHUNKS = 16
DEFAULT_MAX_CACHE_MB = 1024.0


@dataclass(frozen=True)
class QualitySettings:
    """A job spec's ``quality`` node."""

    enabled: bool = True
    text_path: str | None = None
    n_ctx: int = DEFAULT_N_CTX
    n_chunks: int | None = DEFAULT_N_CHUNKS
    max_cache_mb: float = DEFAULT_MAX_CACHE_MB

    @staticmethod
    def from_spec(spec: Mapping[str, Any]) -> QualitySettings:
        node = spec.get("quality") or {}
        n_chunks = node.get("n_chunks", DEFAULT_N_CHUNKS)
        return QualitySettings(
            enabled=bool(node.get("enabled", True)),
            text_path=node.get("text_path"),
            n_ctx=int(node.get("n_ctx", DEFAULT_N_CTX)),
            n_chunks=None if n_chunks is None else int(n_chunks),
            max_cache_mb=float(node.get("max_cache_mb", DEFAULT_MAX_CACHE_MB)),
        )

    @property
    def first(self) -> int:
        """The first scored position of a chunk (llama.cpp: ``n_ctx/2``)."""
        return self.n_ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first


def quality_text(settings: QualitySettings) -> tuple[str, str]:
    """``(label, text)``: the built-in text, or the UTF-8 file ``quality.text_path``."""
    if settings.text_path is None:
        return BUILT_IN, REFERENCE_TEXT
    path = Path(settings.text_path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"quality.text_path={settings.text_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"quality.text_path={settings.text_path} is not readable UTF-8 text: {exc}"
        ) from None
    if not text.strip():
        raise UserError(f"quality.text_path={settings.text_path} is empty; expected text")
    return str(path), text


def quality_chunks(backend: LlamaCppBackend, text: str, settings: QualitySettings) -> np.ndarray:
    """``n_chunks × n_ctx`` token ids, BOS at each chunk's first position when the model adds
    BOS (perplexity.cpp overwrites that token, and never scores it)."""
    if settings.n_ctx > backend.n_ctx:
        raise UserError(
            f"quality.n_ctx={settings.n_ctx} is larger than the context llama.cpp allocated "
            f"({backend.n_ctx}, llm.n_ctx={backend.n_ctx_requested}); lower quality.n_ctx or "
            "raise llm.n_ctx"
        )
    tokens = backend.tokenize(text)
    available = len(tokens) // settings.n_ctx
    if available == 0:
        raise UserError(
            f"the quality text has {len(tokens)} tokens, fewer than one chunk of "
            f"quality.n_ctx={settings.n_ctx}; lower quality.n_ctx or give a longer "
            "quality.text_path"
        )
    n_chunks = available if settings.n_chunks is None else min(settings.n_chunks, available)
    chunks = np.asarray(tokens[: n_chunks * settings.n_ctx], dtype=np.int32)
    chunks = chunks.reshape(n_chunks, settings.n_ctx).copy()
    if backend.add_bos:
        chunks[:, 0] = backend.bos
    return chunks


def _chunk_logprobs(
    backend: LlamaCppBackend, chunks: np.ndarray, first: int, label: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(log-probabilities, next tokens)`` of each chunk's scored half, shown as ``label``."""
    with progress.phase(label, len(chunks), "chunks") as shown:
        for chunk in chunks:
            yield backend.chunk_logprobs(chunk.tolist(), first), chunk[first + 1 :]
            shown.advance()


def cache_path(models_dir: Path, base_file: Path, chunks: np.ndarray, first: int) -> Path:
    """Where the base's log-probabilities for exactly these chunks are kept."""
    stat = base_file.stat()
    key = hashlib.sha1(
        f"{base_file.name}|{stat.st_size}|{stat.st_mtime_ns}|{first}|{chunks.shape}|".encode()
        + chunks.tobytes()
    ).hexdigest()[:16]
    return Path(models_dir) / ".quality" / f"{base_file.name}.{key}.npy"


def _check_cache_size(settings: QualitySettings, n_positions: int, n_vocab: int) -> None:
    megabytes = n_positions * n_vocab * 4 / 1e6
    if megabytes > settings.max_cache_mb:
        raise UserError(
            f"the base's log-probabilities for {n_positions} positions × {n_vocab} tokens take "
            f"{megabytes:.0f} MB, more than quality.max_cache_mb={settings.max_cache_mb:g}; "
            "lower quality.n_chunks or quality.n_ctx (or raise quality.max_cache_mb)"
        )


def _score_base(
    backend: LlamaCppBackend, chunks: np.ndarray, first: int, cache: Path | None
) -> np.ndarray:
    """The base's negative log-likelihoods; its log-probabilities go to ``cache`` when given,
    a memory-mapped .npy filled chunk by chunk (memory stays at one chunk) and renamed whole."""
    label = f"quality: scoring {backend.model_path.name}"
    scored = _chunk_logprobs(backend, chunks, first, label)
    if cache is None:
        return np.concatenate([own_scores(logprobs, targets) for logprobs, targets in scored])
    shape = (len(chunks) * (chunks.shape[1] - 1 - first), backend.n_vocab)
    nll, row = [], 0
    with atomic_path(cache) as tmp:
        stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        for logprobs, targets in scored:
            nll.append(own_scores(logprobs, targets))
            stored[row : row + len(logprobs)] = logprobs
            row += len(logprobs)
        stored.flush()
        del stored
    return np.concatenate(nll)


def _compare_with_base(
    backend: LlamaCppBackend, chunks: np.ndarray, first: int, cache: Path
) -> PositionScores:
    base = np.load(cache, mmap_mode="r")
    if base.shape[1] != backend.n_vocab:
        raise UserError(
            f"{backend.model_path} has {backend.n_vocab} tokens but its base file has "
            f"{base.shape[1]}: they are not the same model"
        )
    parts, row = [], 0
    label = f"quality: comparing {backend.model_path.name} with its base"
    for logprobs, targets in _chunk_logprobs(backend, chunks, first, label):
        parts.append(score_positions(logprobs, base[row : row + len(logprobs)], targets))
        row += len(logprobs)
    return PositionScores.concatenate(parts)


def _empty_statistics() -> dict[str, Any]:
    empty = np.zeros(0)
    return kl_statistics(PositionScores(empty, empty, empty, empty, empty.astype(bool)))


def evaluate_quality(
    backend: LlamaCppBackend,
    *,
    base_file: Path | None,
    base_quantization: str | None,
    models_dir: Path,
    settings: QualitySettings,
    open_base: Callable[[Path], LlamaCppBackend],
) -> dict[str, Any]:
    """Perplexity of ``backend``'s file, and the KL-divergence statistics against the base.

    The base's own row is labelled ``reference`` and carries no comparisons: a file compared
    with itself would report KL 0 and 100 % agreement as if they had been measured. Its
    predictions are cached for the other files' jobs, which compare with them (read from that
    cache, or computed from the base file itself when no job has cached them yet).
    """
    label, text = quality_text(settings)
    chunks = quality_chunks(backend, text, settings)
    first = settings.first
    n_positions = len(chunks) * settings.scored_per_chunk
    result: dict[str, Any] = {
        "text": label,
        "n_ctx": settings.n_ctx,
        "n_chunks": len(chunks),
        "add_bos": backend.add_bos,
        "base_quantization": base_quantization,
        "base_file": str(base_file) if base_file else None,
        "reference": False,
        **_empty_statistics(),
        "positions": n_positions,
    }
    if base_file is None:
        result.update(perplexity_of(_score_base(backend, chunks, first, None)))
        return result
    _check_cache_size(settings, n_positions, backend.n_vocab)
    cache = cache_path(models_dir, base_file, chunks, first)
    if base_file.resolve() == backend.model_path.resolve():
        result["reference"] = True
        nll = _score_base(backend, chunks, first, None if cache.is_file() else cache)
        result.update(perplexity_of(nll))
        return result
    if not cache.is_file():
        with open_base(base_file) as base:
            _score_base(base, chunks, first, cache)
    result.update(kl_statistics(_compare_with_base(backend, chunks, first, cache)))
    return result
