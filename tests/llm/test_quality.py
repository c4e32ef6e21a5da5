"""Quality inside the sweep as llama-perplexity --kl-divergence measures it, on real GGUF files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ml_engine.errors import UserError
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.gguf_writer import (
    LlamaShape,
    byte_fallback_vocabulary,
    random_llama_tensors,
    write_llama_gguf,
)
from ml_engine.llm.models import ensure_model_file, model_path
from ml_engine.llm.quality import (
    REFERENCE_TEXT,
    QualitySettings,
    evaluate_quality,
    quality_chunks,
)
from ml_engine.llm.quantize import quantize_gguf
from tests.llm.conftest import generate_cli, last_line, tiny_model_cfg

SETTINGS = QualitySettings(n_ctx=64, n_chunks=2)


def _open(path: Path, n_batch: int = 64) -> LlamaCppBackend:
    # flash attention off: its f16 accumulation moves log-probabilities by ~5e-4 with the batch
    # split, which would hide what these tests check (which positions are requested)
    return LlamaCppBackend(path, n_ctx=256, n_threads=1, n_batch=n_batch, flash_attn=False)


def test_chunks_are_cut_as_perplexity_cpp_cuts_them(tiny_backend: LlamaCppBackend) -> None:
    tokens = tiny_backend.tokenize(REFERENCE_TEXT)
    assert tokens[0] == tiny_backend.bos and tiny_backend.add_bos
    chunks = quality_chunks(tiny_backend, REFERENCE_TEXT, QualitySettings(n_ctx=100, n_chunks=3))
    assert chunks.shape == (3, 100)
    for i, chunk in enumerate(chunks):
        # BOS replaces each chunk's first token; the rest is the text's tokens in order
        assert chunk[0] == tiny_backend.bos
        assert chunk[1:].tolist() == tokens[i * 100 + 1 : (i + 1) * 100]
    every = quality_chunks(tiny_backend, REFERENCE_TEXT, QualitySettings(n_ctx=100, n_chunks=None))
    assert len(every) == len(tokens) // 100


def test_a_text_too_short_or_a_window_too_wide_is_one_line(tiny_backend: LlamaCppBackend) -> None:
    with pytest.raises(
        UserError, match=r"has \d+ tokens, fewer than one chunk of quality.n_ctx=64"
    ):
        quality_chunks(tiny_backend, "short text", SETTINGS)
    with pytest.raises(UserError, match=r"quality.n_ctx=4096 is larger than the context"):
        quality_chunks(tiny_backend, REFERENCE_TEXT, QualitySettings(n_ctx=4096))


def test_only_the_scored_half_is_requested_and_batches_do_not_change_it(tiny_f32: Path) -> None:
    with _open(tiny_f32, n_batch=64) as one_batch, _open(tiny_f32, n_batch=24) as three_batches:
        chunk = quality_chunks(one_batch, REFERENCE_TEXT, SETTINGS)[0].tolist()
        whole = one_batch.chunk_logprobs(chunk, 0)
        half = one_batch.chunk_logprobs(chunk, 32)
        split = three_batches.chunk_logprobs(chunk, 32)
    assert whole.shape == (63, one_batch.n_vocab) and half.shape == (31, one_batch.n_vocab)
    np.testing.assert_allclose(half, whole[32:], atol=2e-4)
    np.testing.assert_allclose(split, half, atol=2e-4)
    np.testing.assert_allclose(np.exp(half).sum(-1), 1, rtol=1e-9)


def _evaluate(backend: LlamaCppBackend, base: Path, cache_dir: Path, open_base, **settings):
    return evaluate_quality(
        backend,
        base_file=base,
        base_quantization="f32",
        models_dir=cache_dir,
        settings=QualitySettings(**{"n_ctx": 64, "n_chunks": 2, **settings}),
        open_base=open_base,
    )


def test_quantized_file_against_the_f32_base(models_dir: Path, tmp_path: Path) -> None:
    base = model_path(tiny_model_cfg(), "f32", models_dir)
    quantized = ensure_model_file(tiny_model_cfg(), "q2_k", models_dir, n_threads=1).path
    opened = []

    def open_base(path: Path) -> LlamaCppBackend:
        opened.append(path)
        return _open(path)

    with _open(quantized) as backend:
        first = _evaluate(backend, base, tmp_path, open_base)
        again = _evaluate(backend, base, tmp_path, open_base)
    assert opened == [base]  # the base's predictions are computed once, then read from cache
    assert first == again
    assert first["positions"] == 2 * (64 - 1 - 32) and first["n_chunks"] == 2
    assert first["text"] == "built-in" and first["reference"] is False
    assert math.isfinite(first["perplexity"]) and first["perplexity"] > 1
    assert first["perplexity_unc"] > 0 and first["perplexity_base"] > 1
    assert 0 < first["top1_agreement"] < 1  # 2-bit weights change some predictions
    assert first["kl_mean"] > 0 and first["kl_mean_unc"] > 0
    assert first["kl_max"] >= first["kl_p99"] >= first["kl_median"] >= first["kl_min"] >= 0
    (cached,) = (tmp_path / ".quality").glob("*.npy")
    stored = np.load(cached)
    assert stored.dtype == np.float32 and stored.shape == (62, backend.n_vocab)

    with _open(base) as backend:
        itself = _evaluate(backend, base, tmp_path, open_base)
    # the base is labelled the reference instead of reporting KL 0 / agreement 1 with itself
    assert itself["reference"] is True and math.isfinite(itself["perplexity"])
    comparisons = ("top1_agreement", "kl_mean", "kl_max", "dp_rms", "ppl_ratio", "perplexity_base")
    assert all(itself[key] is None for key in comparisons)
    assert itself["perplexity"] == pytest.approx(first["perplexity_base"], rel=1e-5)
    assert opened == [base]  # and it opened no second copy of itself


def test_the_base_job_leaves_its_predictions_for_the_others(models_dir: Path, tmp_path: Path):
    base = model_path(tiny_model_cfg(), "f32", models_dir)
    quantized = ensure_model_file(tiny_model_cfg(), "q8_0", models_dir, n_threads=1).path

    def never(path: Path) -> LlamaCppBackend:
        raise AssertionError(f"the base's cached predictions should have been used, not {path}")

    with _open(base) as backend:
        assert _evaluate(backend, base, tmp_path, never)["reference"] is True
    with _open(quantized) as backend:
        other = _evaluate(backend, base, tmp_path, never)
    assert other["reference"] is False and other["kl_mean"] > 0 and other["top1_agreement"] < 1


def test_held_out_text_and_the_cache_bound(models_dir: Path, tmp_path: Path) -> None:
    base = model_path(tiny_model_cfg(), "f32", models_dir)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    with _open(base) as backend:
        result = _evaluate(backend, base, tmp_path, _open, text_path=str(held_out), n_chunks=None)
        assert (
            result["text"] == str(held_out)
            and result["n_chunks"] == len(backend.tokenize(held_out.read_text())) // 64
        )
        with pytest.raises(UserError, match=r"more than quality.max_cache_mb=0.01; lower") as error:
            _evaluate(backend, base, tmp_path / "other", _open, max_cache_mb=0.01)
        assert "\n" not in str(error.value)
        with pytest.raises(UserError, match=r"quality.text_path=.*nope.txt: no such file"):
            _evaluate(backend, base, tmp_path, _open, text_path=str(tmp_path / "nope.txt"))


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
            results[quantization] = _evaluate(backend, base, tmp_path, _open, n_chunks=4)
            if quantization == "f32":
                chunk = quality_chunks(backend, REFERENCE_TEXT, SETTINGS)[0].tolist()
                reference = backend.chunk_logprobs(chunk, 32)
    # not near uniform: the top token holds far more than 1/n_vocab of the probability
    assert np.exp(reference).max(axis=-1).mean() > 10 / reference.shape[-1]

    assert results["f32"]["reference"] is True and results["f32"]["kl_mean"] is None
    q4 = results["q4_k_m"]
    assert q4["reference"] is False and q4["kl_mean"] > 0.01 and q4["top1_agreement"] < 1
    kl = {q: results[q]["kl_mean"] for q in PEAKED_QUANTIZATIONS}
    assert kl["q8_0"] < kl["q4_k_m"] < kl["q2_k"], kl
    agreement = [results[q]["top1_agreement"] for q in PEAKED_QUANTIZATIONS]
    assert agreement == sorted(agreement, reverse=True), agreement


@pytest.mark.slow
def test_a_sweep_over_a_peaked_file_by_path_ranks_the_quantizations(
    peaked_models: dict[str, Path], tmp_path: Path
) -> None:
    done = generate_cli(
        f"llm.model.path={peaked_models['f32']}",
        "llm.quantization=f32,q8_0,q4_k_m,q2_k",
        "quality.n_chunks=6",
        "bench.repetitions=1",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "out",
        timeout=600,
        multirun=True,
    )
    assert done.returncode == 0, done.stderr
    sweep = Path(last_line(done.stdout).removeprefix("summary: ")).parent
    rows = {
        job["metrics"]["quantization"]: job["metrics"]
        for job in json.loads((sweep / "summary.json").read_text())["jobs"]
    }
    assert set(rows) == {"f32", "q8_0", "q4_k_m", "q2_k"}
    assert all(row["model"] == "peaked" for row in rows.values())
    reference = rows["f32"]
    assert reference["quality/reference"] is True and reference["quality/kl_mean"] is None
    kl = {q: rows[q]["quality/kl_mean"] for q in PEAKED_QUANTIZATIONS}
    assert 0 < kl["q8_0"] < kl["q4_k_m"] < kl["q2_k"], kl
    for q in PEAKED_QUANTIZATIONS:  # each mean is many standard errors apart from zero
        assert rows[q]["quality/kl_mean_unc"] < kl[q] / 3
        assert rows[q]["quality/positions"] == 6 * (64 - 1 - 32)
    assert rows["q2_k"]["quality/top1_agreement"] < 1
    q8 = rows["q8_0"]
    assert q8["quality/ppl_ratio"] > 1 - 3 * q8["quality/ppl_ratio_unc"]  # not better than f32
    assert abs(q8["quality/ppl_ratio"] - 1) < 0.01
    assert q8["quality/ln_ppl_correlation"] > 0.99
    header = (sweep / "summary.csv").read_text().splitlines()[0]
    for column in ("quality/kl_mean", "quality/kl_mean_unc", "quality/kl_p99", "quality/dp_rms"):
        assert column in header
    assert (sweep / "summary.png").stat().st_size > 10_000
