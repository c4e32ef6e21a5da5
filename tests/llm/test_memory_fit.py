"""memory_fit: the estimate from a GGUF's header against the RSS a load really takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_engine.errors import UserError
from ml_engine.llm.memory_fit import (
    estimate,
    format_bytes,
    measure_load,
    parse_bytes,
    read_header,
    tensor_bytes,
)
from ml_engine.llm.models import model_path
from tests.llm.conftest import generate_cli, last_line, tiny_model_cfg


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


# ---- generate.py held to llm.memory_budget (issue 27 point 4) -----------------------------


def test_generate_refuses_a_budget_below_the_estimate_and_reports_it_above(
    models_dir: Path, tmp_path: Path
) -> None:
    """Below the estimate: one ``error:`` line naming both sizes, exit 1, no run dir (the check
    reads the header before any work). Above it: ``result.json`` holds estimate vs measured.
    f32: the file the session's models dir already holds, so the header is there to read."""
    tiny = model_path(tiny_model_cfg(), "f32", models_dir)
    needed = format_bytes(estimate(tiny, 512, n_batch=512).total_bytes)
    refused_dir = tmp_path / "refused"
    done = generate_cli(
        "llm.quantization=f32",
        "llm.memory_budget=1MiB",
        models_dir=models_dir,
        outputs=refused_dir,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert f"needs an estimated {needed}" in lines[0], lines[0]
    assert "llm.memory_budget=1.00 MiB" in lines[0], lines[0]
    assert not list(refused_dir.rglob("result.json")) and not list(refused_dir.rglob("runs/*"))

    done = generate_cli(
        "llm.quantization=f32",
        "llm.memory_budget=8GiB",
        models_dir=models_dir,
        outputs=tmp_path / "fits",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(last_line(done.stdout).removeprefix("run_dir: "))
    memory = json.loads((run_dir / "result.json").read_text())["memory"]
    assert memory["estimate_bytes"] > 0 and memory["measured_bytes"] > 0, memory
    assert memory["estimate_total_bytes"] > memory["estimate_bytes"], memory  # + the baseline
    assert memory["estimate_over_measured"] > 0, memory
    assert memory["parts"]["budget_bytes"] == 8 * 1024**3, memory
    assert memory["parts"]["weights_bytes"] > 0 and memory["parts"]["kv_cache_bytes"] > 0
