"""Perplexity and agreement/KL against the base file, as in llama.cpp's --kl-divergence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.models import ensure_model_file, model_path
from ml_engine.llm.quality import compare, evaluate_quality, perplexity
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

    with _open(base) as backend:
        itself = evaluate_quality(
            backend,
            base_file=base,
            base_quantization="f32",
            models_dir=cache_dir,
            n_tokens=64,
            open_base=open_base,
        )
    assert itself["top1_agreement"] == 1.0
    assert itself["kl_mean"] == pytest.approx(0.0, abs=1e-6)


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
