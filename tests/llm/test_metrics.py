"""Every view of a generation job's row is derived from the one declaration, llm.metrics."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from ml_engine.__main__ import ENTRYPOINTS
from ml_engine.errors import UserError
from ml_engine.llm import metrics
from ml_engine.llm.backends import BACKENDS
from ml_engine.llm.metrics import METRICS, Metric
from ml_engine.llm.quantize import quantization_names
from ml_engine.llm.rules import GENERATE_RULES
from ml_engine.llm.sweep_report import GenerationSweepSummary
from ml_engine.run.locations import CONFIG_DIR
from ml_engine.run.rules import check_config
from tests.conftest import compose_config

PARTS = {
    "setting": {"model": {"name": "tiny"}, "quantization": "q8_0", "n_gpu_layers": 99},
    "facts": {"backend": "llama_cpp", "file_size_bytes": 2_345_678, "compute_backend": "CPU"},
    "bench": {"gen_tokens_per_s": 100.0, "gen_tokens_per_s_std": 5.0, "ttft_s": 0.01234},
    "tests": {"pp": {"avg_ts": 900.0, "avg_ts_std": 9.0}, "n_prompt": 512},
    "quality": {"perplexity": 12.5, "reference": False, "kl_mean": 0.2},
    "work": {"peak_rss_mb": 55.0},
    "imatrix": {"used": True, "plain": {"kl_mean": 0.3}, "imatrix": {"kl_mean": 0.2}},
}


def test_names_are_unique_and_sources_name_a_part() -> None:
    names = metrics.metric_names()
    assert len(names) == len(set(names))
    assert {m.source.split(".")[0] for m in METRICS} <= {*PARTS}


def test_row_reads_each_field_from_its_source() -> None:
    row = metrics.row_of(PARTS)
    assert list(row) == metrics.metric_names()
    assert row["model"] == "tiny" and row["file_mb"] == 2.346
    assert row["gen/tokens_per_s"] == 100.0 and row["gen/tokens_per_s_std"] == 5.0
    assert row["load_s"] is None  # absent from the parts
    assert (row["pp/avg_ts"], row["pp/avg_ts_std"], row["n_prompt"]) == (900.0, 9.0, 512)
    assert row["tg/avg_ts"] is None  # no tg test
    assert (row["imatrix"], row["imatrix/kl_mean_plain"], row["imatrix/kl_mean_weighted"]) == (
        True,
        0.3,
        0.2,
    )
    final = metrics.final_metrics(row)
    assert final["gen/tokens_per_s"] == 100.0 and final["ttft_s_std"] is None
    assert "model" not in final


def test_report_line_prints_each_labelled_metric_with_its_spread() -> None:
    text = metrics.report_text(metrics.row_of(PARTS))
    assert text.startswith("gen 100.0 ± 5.0 tok/s, prompt n/a ± n/a tok/s, ttft 0.0123 ± n/a s")
    # a ± is printed where it is known; the base's missing KLD is left out, not "n/a"
    assert text.endswith("peak 55.0 MB, perplexity 12.50, KLD 0.2 nats")
    parts = {**PARTS, "quality": {"perplexity": 12.5, "perplexity_unc": 0.25, "kl_mean": None}}
    assert metrics.report_text(metrics.row_of(parts)).endswith("perplexity 12.50 ± 0.25")
    parts = {**PARTS, "quality": {"kl_mean": 1.5e-05, "kl_mean_unc": 2.25e-07}}
    assert metrics.report_text(metrics.row_of(parts)).endswith("KLD 1.5e-05 ± 2.25e-07 nats")


def test_a_metric_added_in_one_line_reaches_every_view(monkeypatch: pytest.MonkeyPatch) -> None:
    added = Metric(
        "gen/joules_per_token",
        "J",
        "energy per generated token",
        "bench.joules",
        spread=True,
        curve="joules",
        final=True,
        column=True,
        report="energy",
        digits=2,
    )
    monkeypatch.setattr(metrics, "METRICS", (*METRICS, added))
    monkeypatch.setattr(metrics, "_BY_NAME", {m.name: m for m in metrics.METRICS})
    parts = {**PARTS, "bench": {**PARTS["bench"], "joules": 0.5, "joules_std": 0.1}}
    row = metrics.row_of(parts)
    assert row["gen/joules_per_token"] == 0.5 and row["gen/joules_per_token_std"] == 0.1
    assert {"gen/joules_per_token", "gen/joules_per_token_std"} <= set(metrics.summary_columns())
    assert set(metrics.final_metrics(row)) >= {"gen/joules_per_token", "gen/joules_per_token_std"}
    assert metrics.curve_points([{"joules": 0.4}])[0]["gen/joules_per_token"] == 0.4
    assert "energy 0.50 ± 0.10 J" in metrics.report_text(row)
    assert metrics.definitions()["gen/joules_per_token"]["unit"] == "J"
    assert GenerationSweepSummary(metric="gen/joules_per_token").metric_std == (
        "gen/joules_per_token_std"
    )


def test_sweep_summary_from_config_takes_its_names_from_the_declaration() -> None:
    cfg = compose_config("generate")
    summary = instantiate(cfg.hydra.callbacks.sweep_summary)
    assert summary.metric == cfg.optimized_metric == metrics.RANKING
    assert (
        summary.metric_std == "gen/tokens_per_s_std" and summary.metric_samples == "n_repetitions"
    )
    assert summary.columns == metrics.summary_columns()
    assert "quality/reference" in summary.columns and summary.columns[-1] == "wall_s"


def test_a_misspelt_summary_name_is_one_line_naming_the_fields() -> None:
    with pytest.raises(UserError, match=r"'gen/tokens_per_sec' is not a field") as error:
        GenerationSweepSummary(columns=["model", "gen/tokens_per_sec"])
    assert "\n" not in str(error.value) and "quality/kl_mean" in str(error.value)


def test_the_generate_entrypoint_checks_the_generate_rules() -> None:
    assert ENTRYPOINTS["generate"].rules is GENERATE_RULES
    check_config(compose_config("generate"), GENERATE_RULES)
    with pytest.raises(UserError, match=r"optimized_metric='gen/speed' is not valid"):
        check_config(compose_config("generate", ["optimized_metric=gen/speed"]), GENERATE_RULES)


def test_backend_configs_are_the_backends_list() -> None:
    files = sorted(path.stem for path in (CONFIG_DIR / "llm" / "backend").glob("*.yaml"))
    assert files == sorted(BACKENDS)


@pytest.mark.parametrize(
    "model", sorted(p.stem for p in (CONFIG_DIR / "llm" / "model").glob("*.yaml"))
)
def test_every_model_config_names_only_known_quantizations(model: str) -> None:
    cfg = compose_config("generate", [f"llm/model={model}"])
    check_config(cfg, GENERATE_RULES)  # llm.model.downloadable among them


def test_an_unknown_downloadable_quantization_is_refused() -> None:
    cfg = compose_config("generate", ["llm/model=llama3_1_8b", "llm.model.downloadable=[q9]"])
    with pytest.raises(UserError, match=r"llm\.model\.downloadable=\[.q9.\] is not valid") as error:
        check_config(cfg, GENERATE_RULES)
    assert ", ".join(quantization_names()) in str(error.value)
