"""Perplexity and agreement/KL against the base file, as in llama.cpp's --kl-divergence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.gguf_writer import (
    LlamaShape,
    byte_fallback_vocabulary,
    random_llama_tensors,
    write_llama_gguf,
)
from ml_engine.llm.models import ensure_model_file, model_path
from ml_engine.llm.quality import compare, evaluate_quality, perplexity, reference_tokens
from ml_engine.llm.quantize import quantize_gguf
from tests.llm.conftest import tiny_model_cfg


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    logprobs = np.full((5, 50), -math.log(50), dtype=np.float32)
    assert perplexity(logprobs, [0, 1, 2, 3, 4, 5]) == pytest.approx(50, rel=1e-5)


def test_compare_identical_and_different_distributions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 30))
    base = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    same = compare(base, base)
    assert same["top1_agreement"] == 1.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    shifted = np.roll(base, 1, axis=-1)
    other = compare(shifted, base)
    assert other["top1_agreement"] < 0.5 and other["kl_mean"] > 0.1


def _open(path: Path) -> LlamaCppBackend:
    return LlamaCppBackend(path, n_ctx=256, n_threads=1, n_batch=64)


def test_quantized_file_against_the_f32_base(models_dir: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "models"
    cache_dir.mkdir()
    base = model_path(tiny_model_cfg(), "f32", models_dir)
    quantized = ensure_model_file(tiny_model_cfg(), "q2_k", models_dir, n_threads=1).path
    opened = []

    def open_base(path: Path) -> LlamaCppBackend:
        opened.append(path)
        return _open(path)

    with _open(quantized) as backend:
        first = evaluate_quality(
            backend,
            base_file=base,
            base_quantization="f32",
            models_dir=cache_dir,
            n_tokens=64,
            open_base=open_base,
        )
        again = evaluate_quality(
            backend,
            base_file=base,
            base_quantization="f32",
            models_dir=cache_dir,
            n_tokens=64,
            open_base=open_base,
        )
    assert opened == [base]  # the base's predictions are computed once, then read from cache
    assert first == again
    assert first["reference_tokens"] == 64
    assert math.isfinite(first["perplexity"]) and first["perplexity"] > 1
    assert 0 < first["top1_agreement"] < 1  # 2-bit weights change some predictions
    assert first["kl_mean"] > 0
    assert list((cache_dir / ".quality").glob("*.npy"))

    assert first["reference"] is False

    with _open(base) as backend:
        itself = evaluate_quality(
            backend,
            base_file=base,
            base_quantization="f32",
            models_dir=cache_dir,
            n_tokens=64,
            open_base=open_base,
        )
    # the base is labelled the reference instead of reporting agreement 1.0 / KL 0 with itself
    assert itself["reference"] is True
    assert itself["top1_agreement"] is None and itself["kl_mean"] is None
    assert itself["kl_max"] is None
    assert math.isfinite(itself["perplexity"])
    assert opened == [base]  # and it opened no second copy of itself


def test_the_base_job_leaves_its_predictions_for_the_others(models_dir: Path, tmp_path: Path):
    base = model_path(tiny_model_cfg(), "f32", models_dir)
    quantized = ensure_model_file(tiny_model_cfg(), "q8_0", models_dir, n_threads=1).path

    def never(path: Path) -> LlamaCppBackend:
        raise AssertionError(f"the base's cached predictions should have been used, not {path}")

    settings = dict(base_file=base, base_quantization="f32", models_dir=tmp_path, n_tokens=48)
    with _open(base) as backend:
        assert evaluate_quality(backend, open_base=never, **settings)["reference"] is True
    with _open(quantized) as backend:
        other = evaluate_quality(backend, open_base=never, **settings)
    assert other["reference"] is False and other["kl_mean"] > 0 and other["top1_agreement"] < 1


PEAKED_QUANTIZATIONS = ("q8_0", "q4_k_m", "q2_k")


@pytest.fixture(scope="session")
def peaked_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small llama with weights 5x the tiny model's: its next-token distributions are peaked
    (the tiny model's are near uniform), so quantization moves them visibly. Widths are
    multiples of 256, so the K-quants apply to every matrix."""
    directory = tmp_path_factory.mktemp("peaked")
    shape = LlamaShape(
        n_vocab=512, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=4, n_ctx=512
    )
    assert shape.k_quant_ready
    base = write_llama_gguf(
        directory / "peaked-f32.gguf",
        shape,
        byte_fallback_vocabulary(shape.n_vocab),
        random_llama_tensors(shape, seed=1, std=0.1),
        name="peaked",
    )
    files = {"f32": base}
    for quantization in PEAKED_QUANTIZATIONS:
        files[quantization] = quantize_gguf(
            base, directory / f"peaked-{quantization}.gguf", quantization, n_threads=1
        )
    return files


def test_quantization_really_changes_a_peaked_models_predictions(
    peaked_models: dict[str, Path], tmp_path: Path
) -> None:
    base = peaked_models["f32"]
    results = {}
    for quantization, path in peaked_models.items():
        with _open(path) as backend:
            results[quantization] = evaluate_quality(
                backend,
                base_file=base,
                base_quantization="f32",
                models_dir=tmp_path,
                n_tokens=96,
                open_base=_open,
            )
    with _open(base) as backend:
        reference = backend.next_token_logprobs(reference_tokens(backend, 96))
    # not near uniform: the top token holds far more than 1/n_vocab of the probability
    assert np.exp(reference).max(axis=-1).mean() > 10 / reference.shape[-1]

    assert results["f32"]["reference"] is True and results["f32"]["kl_mean"] is None
    q4 = results["q4_k_m"]
    assert q4["reference"] is False and q4["kl_mean"] > 0.01 and q4["top1_agreement"] < 1
    kl = {q: results[q]["kl_mean"] for q in PEAKED_QUANTIZATIONS}
    assert kl["q8_0"] < kl["q4_k_m"] < kl["q2_k"], kl
    agreement = [results[q]["top1_agreement"] for q in PEAKED_QUANTIZATIONS]
    assert agreement == sorted(agreement, reverse=True), agreement


def test_finer_quantization_agrees_more_with_the_base(models_dir: Path, tmp_path: Path) -> None:
    base = model_path(tiny_model_cfg(), "f32", models_dir)
    results = {}
    for quantization in ("q8_0", "q2_k"):
        path = ensure_model_file(tiny_model_cfg(), quantization, models_dir, n_threads=1).path
        with _open(path) as backend:
            results[quantization] = evaluate_quality(
                backend,
                base_file=base,
                base_quantization="f32",
                models_dir=tmp_path,
                n_tokens=96,
                open_base=_open,
            )
    assert results["q8_0"]["kl_mean"] < results["q2_k"]["kl_mean"]
    assert results["q8_0"]["top1_agreement"] >= results["q2_k"]["top1_agreement"]
