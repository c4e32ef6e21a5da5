"""hparams_search=llm_target: the search on made-up measurements (every branch, deterministic),
then end to end on the tiny model, where only what is deterministic is asserted: quality (KLD)
and what was measured; speed is noisy, so targets sit far below or far above it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_engine.errors import UserError
from ml_engine.llm import measure_cache
from ml_engine.llm.backends.llama_cpp import gpu_offload_supported
from ml_engine.llm.metrics import METRICS
from ml_engine.llm.target_search import (
    CPU_ONLY_NOTE,
    Probe,
    Setting,
    Target,
    TargetSearch,
    parse_target,
    quantization_candidates,
    thread_candidates,
)
from ml_engine.run.locations import PROJECT_ROOT
from tests.llm.conftest import FAST_OVERRIDES, generate_cli, llm_node, tiny_model_cfg

UNITS = {m.name: m.unit for m in METRICS}
QUANTS = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"]
# made-up figures per quantization: faster and worse as precision falls
SPEED = dict(zip(QUANTS, [10, 20, 30, 40, 50, 60, 70, 80], strict=True))
KLD = dict(zip(QUANTS, [0.0, 0.001, 0.01, 0.03, 0.1, 0.2, 0.5, 1.0], strict=True))


class Fake:
    """``measure`` for the search: figures from tables, every call recorded."""

    def __init__(self, speed=SPEED, kld=KLD, threads_gain=None, layers=None, n_layer=None):
        self.speed, self.kld, self.calls = speed, kld, []
        self.threads_gain = threads_gain or {}  # n_threads → factor on the speed
        self.layers = layers  # n_gpu_layers → added speed
        self.n_layer = n_layer

    def __call__(self, setting: Setting) -> Probe:
        self.calls.append(setting)
        speed = self.speed[setting.quantization] * self.threads_gain.get(setting.n_threads, 1.0)
        if self.layers is not None:
            layers = self.n_layer + 1 if setting.n_gpu_layers == -1 else setting.n_gpu_layers
            speed += self.layers(layers)
        return Probe(
            setting,
            speed=speed,
            speed_std=1.0,
            kld=self.kld[setting.quantization],
            ppl_ratio=1.0 + self.kld[setting.quantization],
            quantization=setting.quantization,
            n_threads_used=setting.n_threads or 1,
            n_layer=self.n_layer,
            job=f"job{len(self.calls)}",
        )


def search(target: Target, fake: Fake, threads=(1,), offload=False, default=1) -> TargetSearch:
    return TargetSearch(
        target, QUANTS, list(threads), offload=offload, measure=fake, default_threads=default
    )


def test_binary_search_picks_the_most_precise_quantization_that_reaches_the_speed() -> None:
    fake = Fake()
    verdict = search(Target(45), fake).run()
    assert verdict.winner.setting.quantization == "q4_k_m"  # 50 ≥ 45, q5_k_m's 40 misses
    assert len(fake.calls) <= 4  # log2(8) + 1, not 8
    assert Setting("q5_k_m", 1, 0) in fake.calls  # the neighbour it relies on was measured


def test_a_quality_miss_sends_the_search_to_the_more_precise_half() -> None:
    fake = Fake()
    verdict = search(Target(25, max_kld=0.02), fake).run()
    assert verdict.winner.setting.quantization == "q6_k"
    both = search(Target(25, max_kld=0.02, max_ppl_increase_pct=0.5), Fake()).run()
    assert both.winner is None  # q6_k's PPL +1 % misses the second bound
    # closest: q8_0 (20 % short of the speed) rather than q6_k (PPL bound missed by 100 %)
    assert both.closest.setting.quantization == "q8_0"
    assert [m.constraint for m in _misses(both)] == ["tokens_per_s"]


def _misses(verdict):
    from ml_engine.llm.target_search import misses

    return misses(verdict.closest, verdict.target)


def test_threads_are_tried_only_where_the_configured_count_misses() -> None:
    fake = Fake(threads_gain={2: 2.0, 4: 3.0})
    verdict = search(Target(35, max_kld=0.02), fake, threads=(1, 2, 4)).run()
    # q6_k: 30 at 1 thread misses, 60 at 2 meets (fewest threads that do); q8_0: 40 at 2 meets
    assert verdict.winner.setting == Setting("q8_0", 2, 0)
    assert Setting("q8_0", 4, 0) not in fake.calls  # 2 threads met it: 4 never measured
    assert all(s.n_threads == 1 for s in fake.calls if s.quantization == "q2_k")


def test_fewest_gpu_layers_that_still_meet_the_target() -> None:
    fake = Fake(layers=lambda n: 10 * n, n_layer=32)
    verdict = search(Target(100), fake, offload=True).run()
    assert verdict.winner.setting.quantization == "f16"  # 10 + 330 with every layer
    assert verdict.winner.setting.n_gpu_layers == 9  # 10 + 90 ≥ 100, 8 layers give 90
    assert Setting("f16", 1, -1) in fake.calls
    assert Setting("f16", 1, 8) in fake.calls


def test_a_non_monotonic_speed_is_caught_by_the_verification() -> None:
    # q5_k_m meets; q8_0's (odd) quality miss sends the search above q6_k, which it never
    # measures: the verification does, finds that it meets too, and moves the answer to it
    speed = {**SPEED, "q6_k": 50, "q5_k_m": 50}
    kld = {**KLD, "q8_0": 1.0}
    fake = Fake(speed=speed, kld=kld)
    verdict = search(Target(45, max_kld=0.5), fake).run()
    assert verdict.winner.setting.quantization == "q6_k"
    assert fake.calls[-1] == Setting("q6_k", 1, 0)
    assert any("did not rise" in note for note in verdict.notes)


def test_no_config_meets_names_the_closest_and_by_how_much() -> None:
    verdict = search(Target(1000), Fake()).run()
    assert verdict.winner is None
    assert verdict.closest.setting.quantization == "q2_k"  # 80: the nearest to 1000
    (miss,) = _misses(verdict)
    assert miss.describe("tok/s").startswith("misses tokens_per_s=1000 by 920 tok/s")


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({}, "llm.target.tokens_per_s is required"),
        ({"tokens_per_s": 0}, "tokens_per_s=0 is not valid; expected a number > 0"),
        ({"tokens_per_s": "fast"}, "expected a number > 0"),
        ({"tokens_per_s": 5, "max_kld": -0.1}, "max_kld=-0.1 is not valid"),
        ({"tokens_per_s": 5, "max_ppl_increase_pct": -1}, "max_ppl_increase_pct=-1 is not"),
        ({"tokens_per_s": 5, "metric": "ttft_s"}, "not a rate this job reports"),
    ],
)
def test_invalid_targets_are_refused(node: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_target(node, UNITS)


def test_candidates() -> None:
    assert parse_target({"tokens_per_s": 5}, UNITS).speed_only
    assert thread_candidates(None, cores=6) == [1, 2, 4, 6]
    assert thread_candidates([4, 1, 4]) == [1, 4]
    with pytest.raises(UserError, match="n_threads"):
        thread_candidates([0])
    tiny = tiny_model_cfg()
    assert quantization_candidates(None, tiny, Path("/nowhere"), False)[:3] == [
        "f32",
        "f16",
        "bf16",
    ]
    assert quantization_candidates(["q2_k", "q8_0"], tiny, Path("/nowhere"), False) == [
        "q8_0",
        "q2_k",
    ]
    with pytest.raises(UserError, match="quantizations"):
        quantization_candidates(["q9"], tiny, Path("/nowhere"), False)


def test_file_candidates_respect_allow_requantize(tmp_path: Path, models_dir: Path) -> None:
    from ml_engine.llm.models import ensure_model_file

    quantized = ensure_model_file(tiny_model_cfg(), "q8_0", models_dir).path
    model = {"path": str(quantized)}
    assert quantization_candidates(None, model, tmp_path, False) == ["q8_0"]
    assert quantization_candidates(None, model, tmp_path, True)[:2] == ["q8_0", "q6_k"]
    with pytest.raises(UserError, match="already quantized"):
        quantization_candidates(["q8_0", "q4_k_m"], model, tmp_path, False)
    assert quantization_candidates(None, {"path": str(tmp_path / "no.gguf")}, tmp_path, False) == [
        None
    ]


def test_cache_entry_damaged_is_ignored_then_rewritten(tmp_path: Path, tiny_f32: Path) -> None:
    shutil.copy(tiny_f32, tmp_path / tiny_f32.name)
    spec = {
        "llm": {**llm_node("f32"), "max_tokens": 8, "seed": 1},
        "prompts": ["hello"],
        "bench": {"warmup": 0, "repetitions": 1, "cache": True},
        "quality": {"enabled": False},
        "models_dir": str(tmp_path),
    }
    work = {"facts": {"n_threads": 1}, "bench": {"prompts": []}, "work_s": 1.0, "cached": False}
    assert measure_cache.lookup(spec) is None
    entry = measure_cache.store(spec, tmp_path / tiny_f32.name, work)
    assert measure_cache.lookup(spec)["cached"] is True
    assert measure_cache.lookup({**spec, "prompts": ["other"]}) is None  # another setting
    entry.write_text('{"key": "trunc')
    assert measure_cache.lookup(spec) is None  # ignored, not a crash
    measure_cache.store(spec, tmp_path / tiny_f32.name, work)
    assert measure_cache.lookup(spec)["facts"] == {"n_threads": 1}


# ---- end to end on the tiny model

TARGET = ("hparams_search=llm_target",)


def _search(*overrides: str, models: Path, outputs: Path) -> subprocess.CompletedProcess:
    return generate_cli(*TARGET, *overrides, models_dir=models, outputs=outputs)


def _verdict(outputs: Path) -> dict:
    (path,) = outputs.glob("generate/multiruns/*/search.json")
    return json.loads(path.read_text())


def _own_models(tmp_path: Path, tiny_f32: Path) -> Path:
    """A models dir of the test's own (its cache starts empty) holding the tiny f32."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_f32, models / tiny_f32.name)
    return models


@pytest.mark.slow
def test_search_meets_a_reachable_target_with_the_most_precise_quantization(
    tmp_path: Path, models_dir: Path
) -> None:
    # 1 tok/s: every setting reaches it, so quality decides: q8_0 (KLD ≈ 1e-5) is the most precise
    result = _search(
        "llm.target.tokens_per_s=1",
        "llm.target.max_kld=0.05",
        "llm.target.quantizations=[q8_0,q4_k_m,q2_k]",
        models=models_dir,
        outputs=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MEETS TARGET: q8_0 n_gpu_layers=0 n_threads=1 at " in result.stdout
    verdict = _verdict(tmp_path)
    assert verdict["winner"]["quantization"] == "q8_0"
    assert [p["quantization"] for p in verdict["probes"]] == ["q4_k_m", "q8_0"]  # no q2_k
    commands = verdict["commands"]
    assert commands["llama-server"].startswith("llama-server -m ")
    assert " -ngl 0 -t 1 -c 512 " in commands["llama-cli"]
    assert "llm.n_threads=1 llm.n_gpu_layers=0" in commands["generate.py"]
    assert '"quantization": "q8_0"' in commands["request"]
    assert (tmp_path.glob("generate/multiruns/*/search.md").__next__()).is_file()
    if not gpu_offload_supported():
        assert CPU_ONLY_NOTE in result.stdout


def test_quality_bound_no_quantization_meets(tmp_path: Path, models_dir: Path) -> None:
    result = _search(
        "llm.target.tokens_per_s=1",
        "llm.target.max_kld=1e-12",
        "llm.target.quantizations=[q8_0,q4_k_m]",
        models=models_dir,
        outputs=tmp_path,
    )
    assert result.returncode == 1
    assert "NO CONFIG MEETS IT" in result.stdout
    closest = _verdict(tmp_path)["closest"]
    assert closest["quantization"] == "q8_0"  # the smallest KLD: deterministic
    assert "misses max_kld=1e-12" in closest["misses"][0]


@pytest.mark.slow
def test_unreachable_target_writes_the_verdict_and_ends_in_one_error(
    tmp_path: Path, models_dir: Path
) -> None:
    result = _search(
        "llm.target.tokens_per_s=1e9",
        "llm.target.quantizations=[q8_0,q4_k_m]",
        "llm.target.n_threads=[1]",  # threads fallback: see test_threads_are_tried_only_where…
        models=models_dir,
        outputs=tmp_path,
    )
    assert result.returncode == 1
    assert "NO CONFIG MEETS IT" in result.stdout and "closest: " in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("error: no config meets the target")
    assert "misses tokens_per_s=1e+09" in errors[0]
    verdict = _verdict(tmp_path)
    assert verdict["verdict"] == "no_config_meets"
    assert verdict["closest"]["quantization"] in ("q8_0", "q4_k_m")
    assert list(tmp_path.glob("generate/multiruns/*/summary.md"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("llm.target.tokens_per_s=-3",), "error: llm.target.tokens_per_s=-3 is not valid"),
        (("llm.target.max_kld=0.1",), "error: llm.target.tokens_per_s is required"),
        (
            ("llm.target.tokens_per_s=5", "llm.quantization=q8_0"),
            "error: llm.quantization=q8_0: the target search chooses llm.quantization",
        ),
    ],
)
def test_invalid_search_is_refused_before_any_job(
    tmp_path: Path, models_dir: Path, overrides: tuple[str, ...], message: str
) -> None:
    result = _search(*overrides, models=models_dir, outputs=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not list(tmp_path.rglob("job.json"))


def test_missing_file_stops_at_the_first_job(tmp_path: Path, models_dir: Path) -> None:
    result = _search(
        "llm.target.tokens_per_s=5",
        f"llm.model.path={tmp_path / 'nothere.gguf'}",
        models=models_dir,
        outputs=tmp_path,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"error: llm.model.path={tmp_path / 'nothere.gguf'}: no such file (expected a .gguf)"
    )
    assert len(list(tmp_path.rglob("job.json"))) == 1


@pytest.mark.slow
def test_rerun_is_all_cached_and_loads_no_model(tmp_path: Path, tiny_f32: Path) -> None:
    models = _own_models(tmp_path, tiny_f32)
    args = ("llm.target.tokens_per_s=1", "llm.target.quantizations=[q8_0,q4_k_m]")
    first = _search(*args, models=models, outputs=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    assert _verdict(tmp_path / "a")["cached_jobs"] == 0
    again = _search(*args, models=models, outputs=tmp_path / "b")
    assert again.returncode == 0, again.stderr[-2000:]
    verdict = _verdict(tmp_path / "b")
    assert verdict["jobs"] == verdict["cached_jobs"] >= 1
    assert verdict["winner"]["quantization"] == _verdict(tmp_path / "a")["winner"]["quantization"]
    assert not list((tmp_path / "b").rglob("worker.log"))  # no model worker ever started


@pytest.mark.slow
def test_killed_search_resumes_from_what_it_measured(tmp_path: Path, tiny_f32: Path) -> None:
    models = _own_models(tmp_path, tiny_f32)
    search_args = [
        "llm.target.tokens_per_s=1e9",
        "llm.target.quantizations=[q8_0,q4_k_m,q2_k]",
        "llm.target.n_threads=[1]",
    ]
    args = [*TARGET, *search_args, *FAST_OVERRIDES, f"paths.models_dir={models}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    child = subprocess.Popen(
        [
            sys.executable,
            str(PROJECT_ROOT / "generate.py"),
            *args,
            f"paths.log_dir={tmp_path / 'a'}",
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own group: the kill reaches the model worker too
    )
    deadline = time.monotonic() + 120
    while not list((models / ".measurements").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
        assert child.poll() is None, "the search ended before its first measurement was kept"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (next((tmp_path / "a").glob("generate/multiruns/*")) / "search.json").exists()
    resumed = _search(*search_args, models=models, outputs=tmp_path / "b")
    assert resumed.returncode == 1  # unreachable, by design: the point is what was reused
    verdict = _verdict(tmp_path / "b")
    assert verdict["cached_jobs"] >= 1
    assert verdict["probes"][0]["cached"] is True  # the job the killed run finished first
