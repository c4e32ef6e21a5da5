"""A generation job shows what it is doing (a phase name and an ETA on each line, plain lines when
redirected) and a single run prints the text it generated; a sweep keeps to its summary."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from ml_engine.llm.generate import shown_text
from ml_engine.llm.progress import PlainSink, duration
from ml_engine.llm.target_search import Target
from tests.llm.conftest import generate_cli, last_line
from tests.llm.test_target_search import QUANTS, Fake, search

BOX_DRAWING = re.compile("[\u2500-\u259f]")  # rich's bars
ETA = r"ETA (\d+(\.\d)? s|\d+ min \d\d s)"


def _phase_lines(stdout: str, label: str) -> tuple[list[str], list[str]]:
    """(lines with a count and an ETA, done lines) of the phase whose name starts ``label``."""
    start = re.escape(label)
    counted = re.compile(rf"^{start}[^:]*: \d+/\d+ \w+ \(\d+%\), [\d.e+-]+ \w+/s, {ETA}$")
    done = re.compile(rf"^{start}[^:]*: (\d+)/\1 \w+ done in [\d.]+ s$")
    lines = stdout.splitlines()
    return [x for x in lines if counted.match(x)], [x for x in lines if done.match(x)]


def _own_models(tmp_path: Path, tiny_f32: Path) -> Path:
    """A models dir holding the f32 alone, so the job quantizes (and scores the base) itself."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_f32, models / tiny_f32.name)
    return models


def test_a_single_run_shows_every_phase_with_an_eta_then_its_texts(
    tmp_path: Path, tiny_f32: Path
) -> None:
    done = generate_cli(
        "llm.quantization=q4_k_m",
        models_dir=_own_models(tmp_path, tiny_f32),
        outputs=tmp_path / "out",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for label, unit in (
        ("quantizing tiny-", "tensors"),
        ("generating", "runs"),
        ("llama-bench tests (pp16, tg4)", "tests"),
        ("quality: scoring tiny-", "chunks"),  # the base, which no job had cached yet
        ("quality: comparing tiny-", "chunks"),
    ):
        counted, finished = _phase_lines(out, label)
        assert counted and f" {unit} " in counted[0], (label, out[-3000:])
        assert len(finished) == 1, (label, out[-3000:])
    assert re.search(r"^loading tiny q4_k_m …$", out, re.M), out[-3000:]
    assert re.search(r"^loading tiny q4_k_m: done in [\d.]+ s$", out, re.M), out[-3000:]
    assert not BOX_DRAWING.search(out), out[-3000:]  # redirected: no bars

    run_dir = Path(last_line(out).removeprefix("run_dir: "))
    result = json.loads((run_dir / "result.json").read_text())
    prompts = result["bench"]["prompts"]
    assert len(prompts) == 2
    for index, (entry, name) in enumerate(zip(prompts, result["texts"], strict=True), start=1):
        assert f"--- text {index}/2 (finish: length), prompt " in out
        assert shown_text(entry["text"], run_dir / name) in out
    # the texts come before the summary, which stays last
    assert out.index("--- text 2/2") < out.index("tiny q4_k_m ngl=0")


def test_a_long_text_is_cut_and_says_where_the_rest_is(models_dir: Path, tmp_path: Path) -> None:
    words = " ".join(f"word{i}" for i in range(400))  # the mock echoes its prompt
    done = generate_cli(
        "llm/backend=mock",
        f"prompt='{words}'",
        "llm.max_tokens=500",
        "worker.isolate=false",  # the phases print from the job's own process too
        models_dir=models_dir,
        outputs=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(last_line(done.stdout).removeprefix("run_dir: "))
    assert (run_dir / "texts" / "00.txt").read_text() == words
    assert words not in done.stdout
    shown = re.search(r"^word0 word1 .*$\n^\[… (\d+) more characters in (.+)\]$", done.stdout, re.M)
    assert shown, done.stdout[-3000:]
    assert len(shown.group(0).splitlines()[0]) + int(shown.group(1)) == len(words)
    assert Path(shown.group(2)) == run_dir / "texts" / "00.txt"
    counted, finished = _phase_lines(done.stdout, "generating")
    assert counted and len(finished) == 1, done.stdout[-3000:]


@pytest.mark.slow
def test_a_sweep_keeps_its_summary_and_prints_no_texts(models_dir: Path, tmp_path: Path) -> None:
    done = generate_cli(
        "llm/backend=mock",
        "bench.repetitions=1,2",
        models_dir=models_dir,
        outputs=tmp_path,
        multirun=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_line(done.stdout).startswith("summary: ")
    assert "--- text" not in done.stdout
    for prompt in json.loads(next(tmp_path.glob("generate/multiruns/*/0/result.json")).read_text())[
        "bench"
    ]["prompts"]:
        assert prompt["text"] not in done.stdout
    _, finished = _phase_lines(done.stdout, "generating")
    assert len(finished) == 2, done.stdout[-3000:]  # one per job


def test_a_phase_without_a_count_still_says_how_long_so_far(capsys) -> None:
    sink = PlainSink(max_interval_s=0.05)
    sink.start(1, "loading big.gguf", None, "steps")
    printed, deadline = "", time.monotonic() + 30  # generous: only that a line comes at all
    while "so far" not in printed and time.monotonic() < deadline:
        time.sleep(0.05)
        printed += capsys.readouterr().out
    sink.finish(1, None)
    printed += capsys.readouterr().out
    assert re.search(r"^loading big\.gguf …$", printed, re.M), printed
    assert re.search(r"^loading big\.gguf: [\d.]+ s so far$", printed, re.M), printed
    assert re.search(r"^loading big\.gguf: done in [\d.]+ s$", printed, re.M), printed


@pytest.mark.parametrize(
    "target, threads",
    [(Target(45), (1,)), (Target(35, max_kld=0.02), (1, 2, 4)), (Target(1000), (1, 2))],
)
def test_the_search_announces_a_job_budget_it_keeps(target: Target, threads) -> None:
    fake = Fake(threads_gain={2: 2.0, 4: 3.0})
    run = search(target, fake, threads=threads)
    budget = run.probe_budget()
    run.run()
    assert len(fake.calls) <= budget < len(QUANTS) * len(threads) + 1


@pytest.mark.slow
def test_a_target_search_announces_each_job_with_an_eta(tmp_path: Path, tiny_f32: Path) -> None:
    done = generate_cli(
        "hparams_search=llm_target",
        "llm.target.tokens_per_s=1",
        "llm.target.max_kld=0.05",
        "llm.target.quantizations=[q8_0,q4_k_m,q2_k]",
        models_dir=_own_models(tmp_path, tiny_f32),
        outputs=tmp_path / "out",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = re.findall(r"^search job (\d+) of ≤ (\d+): (.*)$", done.stdout, re.M)
    assert [int(n) for n, _, _ in jobs] == [1, 2], done.stdout[-3000:]
    assert jobs[0][2] == "llm.quantization=q4_k_m llm.n_threads=1 llm.n_gpu_layers=0"
    assert re.search(rf"\(.+ per job so far, {ETA.replace('ETA', 'ETA ≤')}\)$", jobs[1][2])
    assert _phase_lines(done.stdout, "quality: comparing tiny-")[1], done.stdout[-3000:]


def test_durations_read_as_a_wait() -> None:
    assert [duration(s) for s in (0.42, 42.4, 220, 3900)] == [
        "0.4 s",
        "42 s",
        "3 min 40 s",
        "1 h 05 min",
    ]
