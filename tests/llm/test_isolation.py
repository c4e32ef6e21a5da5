"""Each job's model work in a child: crashes become errors, memory is returned, partials removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ml_engine.errors import UserError
from ml_engine.llm.isolation import WorkerFailed, run_isolated
from ml_engine.run.locations import PROJECT_ROOT
from tests.llm.conftest import llm_node, partial_files

TARGETS = "tests.llm.crash_targets"


@pytest.fixture(autouse=True)
def _children_import_the_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash targets live in this test package: let the child import it from any cwd."""
    existing = os.environ.get("PYTHONPATH")
    monkeypatch.setenv(
        "PYTHONPATH", str(PROJECT_ROOT) + (os.pathsep + existing if existing else "")
    )


def _run(target: str, payload: dict, tmp_path: Path, **kwargs):
    return run_isolated(
        f"{TARGETS}:{target}",
        payload,
        log_path=tmp_path / "worker.log",
        timeout_s=kwargs.pop("timeout_s", 120),
        **kwargs,
    )


def test_value_comes_back_from_a_different_process(tmp_path: Path) -> None:
    value = _run("echo_pid", {"x": [1, 2]}, tmp_path)
    assert value["x"] == [1, 2] and value["pid"] != os.getpid()


def test_a_crash_is_an_error_naming_the_signal_and_partials_are_removed(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    cache.mkdir()
    with pytest.raises(WorkerFailed, match="SIGABRT") as error:
        _run(
            "abort_after_half_a_write",
            {"target": str(cache / "m.gguf")},
            tmp_path,
            cleanup_dirs=(cache,),
        )
    assert "\n" not in str(error.value)
    assert partial_files(cache) == []


def test_user_errors_keep_their_message(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^llm\.n_ctx is bad$"):
        _run("raise_user_error", {"message": "llm.n_ctx is bad"}, tmp_path)


def test_bugs_are_reported_in_one_line_with_the_traceback_in_the_log(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed, match=r"ZeroDivisionError: division by zero$"):
        _run("raise_bug", {}, tmp_path)
    assert "Traceback" in (tmp_path / "worker.log").read_text()


def test_timeout_stops_the_child(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed, match=r"worker\.timeout_s=1 "):
        _run("sleep", {"seconds": 60}, tmp_path, timeout_s=1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_memory_does_not_grow_over_twenty_model_jobs(models_dir: Path, tmp_path: Path) -> None:
    spec = {
        "llm": {
            **llm_node("q8_0"),
            "max_tokens": 4,
            "temperature": 0.8,
            "top_k": 40,
            "top_p": 0.95,
            "repeat_penalty": 1.1,
            "seed": 1,
        },
        "prompts": ["hello"],
        "bench": {"warmup": 0, "repetitions": 1},
        # each job still loads the quantized file and its f32 base and compares them
        "quality": {"enabled": True, "n_ctx": 64, "n_chunks": 2},
        "models_dir": str(models_dir),
    }
    sizes, child_peaks, compared = [], [], []
    for _ in range(20):
        work = run_isolated(
            "ml_engine.llm.measure:measure_job",
            spec,
            log_path=tmp_path / "worker.log",
            timeout_s=120,
        )
        child_peaks.append(work["peak_rss_mb"])
        compared.append(work["quality"]["kl_mean"])
        sizes.append(_rss_mb())
    # the children hold the model; the parent only reads JSON back
    assert sizes[-1] - sizes[1] < 5.0, sizes
    assert min(child_peaks) > 10 and min(compared) > 0  # each job held both models


@pytest.mark.parametrize(
    ("users", "expected"), [("", None), ("PASSIVE", "PASSIVE"), ("ACTIVE", "ACTIVE")]
)
def test_llama_cpp_workers_get_the_user_s_own_omp_policy(monkeypatch, users, expected) -> None:
    """The entrypoint makes torch's OpenMP threads sleep (PASSIVE); llama.cpp's workers get
    what the user had instead (unset: libgomp's default, which spins briefly)."""
    from ml_engine.llm.isolation import worker_env

    monkeypatch.setenv("ML_ENGINE_USER_OMP_WAIT_POLICY", users)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert worker_env().get("OMP_WAIT_POLICY") == expected
