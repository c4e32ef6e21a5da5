"""The generate task and entrypoint: result files, sweeps, and every user error in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import open_dict

from ml_engine.llm.backends.llama_cpp import GPU_KINDS, llama_devices
from ml_engine.llm.generate import generate
from ml_engine.llm.models import ensure_model_file, model_path
from tests.llm.conftest import generate_cli, last_line, partial_files, tiny_model_cfg


def test_single_run_result_is_complete_and_consistent(gen_cfg) -> None:
    cfg = gen_cfg(["llm.quantization=f32", "prompts=english"])
    metrics = generate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    result = json.loads((run_dir / "result.json").read_text())

    assert result["metrics"] == metrics
    assert result["backend"] == "llama_cpp" and result["quantization"] == "f32"
    assert result["model_description"] and result["file_size_bytes"] > 0 and result["n_params"] > 0
    assert result["n_gpu_layers_requested"] == 0 and result["n_gpu_layers_effective"] == 0
    assert isinstance(result["gpu_offload_supported"], bool)
    assert result["n_threads"] == 1 and result["n_ctx"] == 512
    assert metrics["gen/tokens_per_s"] > 0 and metrics["prompt/tokens_per_s"] > 0
    assert metrics["ttft_s"] > 0 and metrics["load_s"] > 0 and metrics["peak_rss_mb"] > 0

    bench = result["bench"]
    reps = [r for p in bench["prompts"] for r in p["repetitions"]]
    assert len(bench["prompts"]) == 2 and len(reps) == 2 * 2
    assert bench["completion_tokens"] == sum(r["completion_tokens"] for r in reps) == 4 * 8
    assert bench["prompt_tokens"] == sum(r["prompt_tokens"] for r in reps)
    for rep in reps:
        assert rep["n_decoded"] == rep["counters"]["n_eval"] == rep["completion_tokens"] - 1
        assert rep["counters"]["n_p_eval"] == rep["prompt_tokens"]
        assert rep["gen_tokens_per_s"] == pytest.approx(rep["n_decoded"] / rep["gen_s"])

    quality = result["quality"]
    assert math.isfinite(quality["perplexity"]) and quality["base_quantization"] == "f32"
    # the base is the reference: labelled so, and not compared with itself
    assert quality["reference"] is True and metrics["quality/reference"] is True
    assert quality["top1_agreement"] is None and quality["kl_mean"] is None
    assert metrics["quality/top1_agreement"] is None and metrics["quality/kl_mean"] is None
    assert set(result["metric_definitions"]) == set(metrics)
    assert metrics["chat_template"] == "off" and metrics["requantized"] is False
    assert quality["text"] == "built-in" and quality["positions"] == 2 * (64 - 1 - 32)
    for index, entry in enumerate(bench["prompts"]):
        assert (run_dir / result["texts"][index]).read_text(encoding="utf-8") == entry["text"]
    assert (run_dir / "worker.log").exists()  # the model work ran in a child process


def test_configured_models_keep_their_default_quantization() -> None:
    from tests.conftest import compose_config

    cfg = compose_config("generate", ["llm/model=tiny"])
    assert cfg.llm.quantization == "q4_k_m" and cfg.llm.model.path is None
    assert compose_config("generate", ["llm/model=mistral_7b"]).llm.quantization == "q4_k_m"


def test_quantized_run_in_process_compares_with_the_base(gen_cfg) -> None:
    cfg = gen_cfg(["llm.quantization=q4_k_m", "worker.isolate=false", "prompt=Hello there"])
    metrics = generate(cfg)
    assert metrics["quantization"] == "q4_k_m" and metrics["file_mb"] > 0
    assert 0 < metrics["quality/top1_agreement"] <= 1 and metrics["quality/kl_mean"] > 0
    assert metrics["quality/reference"] is False
    result = json.loads((Path(cfg.paths.output_dir) / "result.json").read_text())
    assert [p["prompt"] for p in result["bench"]["prompts"]] == ["Hello there"]


def test_tensorboard_scalars_and_hparams_are_written(gen_cfg) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = gen_cfg(["llm/backend=mock"])
    with open_dict(cfg):
        cfg.logger = {
            "tensorboard": {
                "_target_": "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
                "save_dir": str(Path(cfg.paths.output_dir) / "tensorboard"),
            }
        }
    generate(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert "gen/tokens_per_s" in tags["scalars"]
    assert len(events.Scalars("gen/tokens_per_s")) == 4  # one per repetition
    assert "_hparams_/session_start_info" in tags["tensors"] or events.PluginTagToContent("hparams")


def test_mock_entrypoint_run(models_dir: Path, tmp_path: Path) -> None:
    done = generate_cli(
        "llm/backend=mock", "prompt=one two three", models_dir=models_dir, outputs=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert last_line(done.stdout).startswith("run_dir: ")
    run_dir = Path(last_line(done.stdout).removeprefix("run_dir: "))
    assert run_dir.parent == tmp_path / "generate" / "runs"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["backend"] == "mock" and "MOCK" in result["note"]
    assert result["bench"]["prompts"][0]["text"] == "one two three"
    assert json.loads((run_dir / "job.json").read_text())["status"] == "ok"


def _assert_one_line_error(done, *fragments: str) -> None:
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("llm.n_ctx=-5", ("llm.n_ctx=-5", "integer ≥ 16")),
        ("llm.quantization=q9", ("q9", "f32, f16, bf16, q8_0", "q2_k")),
        ("prompts.items=[]", ("prompt set 'code' is empty",)),
        ("llm.n_gpu_layers=-3", ("llm.n_gpu_layers=-3",)),
        (
            "llm/model=qwen2_5_coder_7b",
            (
                "model file not found:",
                "Qwen2.5-Coder-7B-Instruct-Q4_K_M",
                "hf download",
                "llm.allow_download=true",
            ),
        ),
    ],
)
def test_user_errors_end_in_one_line(override: str, fragments, tmp_path: Path) -> None:
    models = tmp_path / "models"
    done = generate_cli(override, models_dir=models, outputs=tmp_path / "out")
    _assert_one_line_error(done, *fragments)
    assert not list(tmp_path.rglob("result.json"))
    assert not list(tmp_path.rglob("*.gguf")) and partial_files(tmp_path) == []


@pytest.mark.parametrize(
    "damage, meaning",
    [("truncated", "(corrupt or truncated GGUF)"), ("garbage", "(not a GGUF file)")],
)
def test_corrupt_gguf_is_one_line_and_leaves_no_partial_files(
    damage: str, meaning: str, tmp_path: Path, tiny_f32: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    broken = model_path(tiny_model_cfg(), "q8_0", models)
    data = tiny_f32.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a gguf" * 100)
    done = generate_cli("llm.quantization=q8_0", models_dir=models, outputs=tmp_path / "out")
    _assert_one_line_error(done, str(broken), meaning)
    assert partial_files(tmp_path) == []
    assert not list(tmp_path.rglob("result.json"))
    assert sorted(p.name for p in models.iterdir()) == [broken.name]  # nothing else written


def _copy_tiny(models: Path, source_dir: Path, quantizations: tuple[str, ...]) -> None:
    models.mkdir(exist_ok=True)
    for quantization in quantizations:
        source = ensure_model_file(tiny_model_cfg(), quantization, source_dir, n_threads=1).path
        (models / source.name).write_bytes(source.read_bytes())


@pytest.mark.slow
def test_three_by_two_sweep_writes_its_summary_files(models_dir: Path, tmp_path: Path) -> None:
    done = generate_cli(
        "llm.quantization=f32,q8_0,q4_k_m",
        "llm.n_gpu_layers=0,99",
        "bench.repetitions=1",
        models_dir=models_dir,
        outputs=tmp_path,
        timeout=600,
        multirun=True,
    )
    assert done.returncode == 0, done.stderr
    assert last_line(done.stdout).startswith("summary: ")
    summary_md = Path(last_line(done.stdout).removeprefix("summary: "))
    sweep = summary_md.parent
    assert sweep.parent == tmp_path / "generate" / "multiruns"
    for name in ("summary.csv", "summary.md", "summary.json", "summary.png"):
        assert (sweep / name).stat().st_size > 0, name
    jobs = json.loads((sweep / "summary.json").read_text())["jobs"]
    assert len(jobs) == 6 and all(job["status"] == "ok" for job in jobs)
    pairs = {(j["metrics"]["quantization"], j["metrics"]["n_gpu_layers"]) for j in jobs}
    assert pairs == {(q, n) for q in ("f32", "q8_0", "q4_k_m") for n in (0, 99)}
    rates = [j["metrics"]["gen/tokens_per_s"] for j in jobs]
    assert rates == sorted(rates, reverse=True)  # best first
    header = (sweep / "summary.csv").read_text().splitlines()[0]
    assert "gen/tokens_per_s" in header and "quality/perplexity" in header
    assert "quality/reference" in header
    for job in jobs:
        row = job["metrics"]
        if row["quantization"] == "f32":  # the base: the reference, not compared with itself
            assert row["quality/reference"] is True and row["quality/kl_mean"] is None
        else:
            assert row["quality/reference"] is False and row["quality/kl_mean"] > 0
        if not any(d.kind in GPU_KINDS for d in llama_devices()):
            assert (row["n_gpu_layers_effective"], row["compute_backend"]) == (0, "CPU")
    assert "vs_best" in header and (sweep / "summary.md").read_text().count("| best |") == 1


@pytest.mark.slow
def test_a_truncated_gguf_fails_its_job_alone(tmp_path: Path, models_dir: Path) -> None:
    models = tmp_path / "models"
    _copy_tiny(models, models_dir, ("f32", "q4_0"))
    cut = model_path(tiny_model_cfg(), "q4_0", models)
    cut.write_bytes(cut.read_bytes()[:200_000])
    done = generate_cli(
        "llm.quantization=f32,q4_0,q8_0",
        "bench.repetitions=1",
        models_dir=models,
        outputs=tmp_path / "out",
        timeout=600,
        multirun=True,
    )
    assert done.returncode == 0, done.stderr
    sweep = Path(last_line(done.stdout).removeprefix("summary: ")).parent
    jobs = {
        j["metrics"].get("quantization") or j["overrides"][0]: j
        for j in json.loads((sweep / "summary.json").read_text())["jobs"]
    }
    failed = [j for j in jobs.values() if j["status"] == "failed"]
    assert len(failed) == 1 and "q4_0" in " ".join(failed[0]["overrides"])
    assert str(cut) in failed[0]["error"]
    assert sum(j["status"] == "ok" for j in jobs.values()) == 2
    assert "failed" in (sweep / "summary.md").read_text()
    assert partial_files(models) == []
