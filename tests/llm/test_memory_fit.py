"""memory_fit: the estimate from a GGUF's header against the RSS a load really takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_engine.errors import UserError
from ml_engine.llm.memory_fit import estimate, measure_load, parse_bytes, read_header, tensor_bytes


@pytest.mark.parametrize("n_ctx", [256, 4096])
def test_the_estimate_is_within_15_percent_of_the_measured_rss_growth(
    tiny_f32: Path, n_ctx: int
) -> None:
    guess = estimate(tiny_f32, n_ctx)
    measured = measure_load(tiny_f32, n_ctx)  # a fresh process: nothing else in its RSS
    ratio = guess.load_bytes / measured["measured_bytes"]
    assert 0.85 <= ratio <= 1.15, (guess.as_dict(), measured)
    assert guess.n_ctx == measured["n_ctx"]  # padded as llama.cpp pads it


def test_the_header_gives_the_tensor_sizes_the_gguf_package_reads(tiny_f32: Path) -> None:
    from gguf import GGUFReader

    header = read_header(tiny_f32)
    reader = GGUFReader(tiny_f32)
    assert {t.name: int(t.n_bytes) for t in reader.tensors} == {
        name: tensor_bytes(kind, count) for name, (kind, count) in header.tensors.items()
    }
    assert header.get("block_count") == 2 and header.get("context_length") == 2048


def test_the_kv_cache_grows_with_the_padded_context(tiny_f32: Path) -> None:
    small, large = estimate(tiny_f32, 300), estimate(tiny_f32, 512)
    # 300 is padded to 512: the same cache; n_layer × cells × 2 × n_embd × 2 bytes (f16)
    assert small.kv_cache_bytes == large.kv_cache_bytes == 2 * 512 * 2 * 256 * 2
    assert estimate(tiny_f32, 512, cache_type_k="q8_0").kv_cache_bytes < large.kv_cache_bytes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("2GiB", 2 * 1024**3),
        ("512MB", 512 * 1000**2),
        (1000, 1000),
        ("1.5 g", 1610612736),
    ],
)
def test_budgets_parse(value: object, expected: int | None) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", "2 parsecs", -1, 0, True, "GiB"])
def test_a_bad_budget_is_one_line_naming_the_key(value: object) -> None:
    with pytest.raises(UserError) as error:
        parse_bytes(value)
    assert str(error.value).startswith("llm.memory_budget=") and "\n" not in str(error.value)
