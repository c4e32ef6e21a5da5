"""quantize.imatrix on the session's trained model (conftest.py): export.py collects the importance
matrix from the training split with forward hooks and writes it beside the file in the format
llama.cpp's own llama-quantize reads; a quantization= is made with and without it and the file
with the lower mean KLD from the f32 network on the validation split is written; generate.py's
quantize.imatrix=auto finds the matrix beside the exported f32 and gates each row the same way,
and quantize/tensor_types is a sweep axis whose files really hold the asked types.

The generate sweeps on the exported file live here rather than in tests/llm/test_imatrix_gate.py:
the trained model is a fixture of this directory, and training it a second time would double the
cost of these tests.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from ml_engine.llm.gguf_writer import held_out_text_path
from ml_engine.llm.imatrix import (
    ImportanceMatrix,
    matrix_beside,
    model_columns,
    read_imatrix,
    write_imatrix,
)
from ml_engine.llm.quantize import quantize_gguf, tensor_types_of
from ml_engine.llm.sweep_report import speed_and_quality_figure
from ml_engine.run.files import PARTIAL_SUFFIX
from ml_engine.training.lm.export import EXPORT_RULES, export
from tests.conftest import run_as_job, run_entrypoint
from tests.llm.llama_tools import llama_tools  # noqa: F401  (the session fixture)
from tests.training.lm.conftest import LM_BLOCK as BLOCK

GATE_LINE = re.compile(
    r"^imatrix gate: mean KLD (\S+) ± \S+ without the matrix, (\S+) ± \S+ with it: "
    r"kept the file (with|without) it$",
    re.MULTILINE,
)
# a generate sweep as small as it gets: no llama-bench tests, one repetition, 16 quality chunks
SWEEP = (
    "prompt=ROMEO:",
    "llm.max_tokens=4",
    "llm.n_threads=1",
    "llm.n_ctx=128",
    "bench.warmup=0",
    "bench.repetitions=1",
    "bench.n_prompt=0",
    "bench.n_gen=0",
    "quality.n_chunks=16",
    "extras.print_config=false",
    "logger=none",
)


@pytest.fixture(scope="module")
def f32_file(exported: tuple[Path, str]) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def ckpt(lm_run: Path) -> Path:
    return lm_run / "checkpoints" / "best.ckpt"


def _tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every tensor's ggml type and bytes, by name."""
    return {
        t.name: (int(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(str(path)).tensors
    }


def _differing(path: Path, expected: dict[str, tuple[int, bytes]]) -> list[str]:
    """The tensors of ``path`` whose type or bytes differ from ``expected``'s (names: all)."""
    got = _tensors(path)
    assert sorted(got) == sorted(expected)
    return [name for name in got if got[name] != expected[name]]


def _candidates(f32_file: Path, folder: Path, quantization: str, matrix_file: Path) -> dict:
    """The two files the gate chose between, made again from the exported f32."""
    plain = quantize_gguf(f32_file, folder / "again-plain.gguf", quantization, 2)
    weighted = quantize_gguf(
        f32_file,
        folder / "again-imatrix.gguf",
        quantization,
        2,
        imatrix=read_imatrix(matrix_file),
        imatrix_label=str(matrix_file),
    )
    return {"plain": _tensors(plain), "imatrix": _tensors(weighted)}


def _check_gate(record: dict[str, Any]) -> str:
    """Both measurements are there and the lower mean KLD was kept; the kept label."""
    assert record["setting"] == "auto"
    plain, weighted = record["plain"]["kl_mean"], record["imatrix"]["kl_mean"]
    assert plain > 0 and weighted > 0 and plain != weighted, record
    expected = "imatrix" if weighted < plain else "plain"
    assert record["kept"] == expected, record
    assert record["used"] is (expected == "imatrix")
    return expected


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def _sweep(f32_file: Path, tmp_path: Path, *overrides: str) -> tuple[Path, list[dict]]:
    result = run_entrypoint(
        "generate.py",
        "-m",
        f"llm.model.path={f32_file}",
        *SWEEP,
        *overrides,
        f"paths.models_dir={tmp_path / 'models'}",
        f"paths.log_dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = Path(result.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    jobs = json.loads(summary.with_name("summary.json").read_text())["jobs"]
    assert all(job["status"] == "ok" for job in jobs), [job["error"] for job in jobs]
    return summary.parent, jobs


def _result(sweep_dir: Path, job: dict) -> dict[str, Any]:
    return json.loads((sweep_dir / str(job["job"]) / "result.json").read_text())


# ---- the matrix export.py writes


@pytest.mark.slow
def test_the_export_writes_the_training_split_matrix_llama_quantize_reads(
    exported: tuple[Path, str],
    lm_run: Path,
    tmp_path: Path,
    llama_tools: Path,  # noqa: F811
) -> None:
    f32_file, stdout = exported
    matrix_file = matrix_beside(f32_file)
    assert matrix_file == lm_run / f"{f32_file.stem}.imatrix.gguf" and matrix_file.is_file()
    assert f"imatrix: {matrix_file}" in stdout
    matrix = read_imatrix(matrix_file)
    # calibrated on the training split, in windows of the trained context
    (dataset,) = matrix.datasets
    assert dataset.endswith(" (train split)"), dataset
    assert matrix.chunk_size == BLOCK and matrix.chunk_count > 1
    # every weight a blk.* matrix multiplies has its entry, as wide as the weight's input
    columns = model_columns(f32_file)
    blocks = {name: width for name, width in columns.items() if name.startswith("blk.")}
    assert len(blocks) == 7  # one layer: q, k, v, output, gate, up, down
    assert {name: e.n_columns for name, e in matrix.entries.items() if name in blocks} == blocks
    assert set(matrix.entries) <= set(columns)
    for name in blocks:
        entry = matrix.entries[name]
        assert entry.counts.tolist() == [matrix.chunk_count * BLOCK]
        assert (entry.sums > 0).all()
    # the job's record says where it is
    (job,) = [json.loads(p.read_text()) for p in lm_run.parents[2].glob("export/runs/*/job.json")]
    record = job["metrics"]["imatrix"]
    assert record["setting"] == "auto" and record["file"] == str(matrix_file)
    assert record["used"] is False  # f32 is not quantized
    # llama.cpp's own quantizer takes it
    out = tmp_path / "tool-q4_0.gguf"
    done = subprocess.run(
        [str(llama_tools / "llama-quantize"), "--imatrix", str(matrix_file), str(f32_file),
         str(out), "q4_0", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-2000:]
    assert f"loaded {len(matrix.entries)} importance matrix entries from {matrix_file}" in log
    # and quantizes what our in-process quantizer does with it
    ours = quantize_gguf(
        f32_file, tmp_path / "ours-q4_0.gguf", "q4_0", 2, imatrix=matrix, imatrix_label="x"
    )
    assert _differing(out, _tensors(ours)) == []


# ---- the gate in export.py


@pytest.mark.slow
def test_export_q4_0_keeps_the_lower_kld_file_and_records_both(
    ckpt: Path, f32_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "m-q4_0.gguf"
    result = run_entrypoint(
        "export.py",
        f"ckpt_path={ckpt}",
        "quantization=q4_0",
        f"output={output}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"gguf: {output}"
    (job,) = [json.loads(p.read_text()) for p in tmp_path.glob("export/runs/*/job.json")]
    record = job["metrics"]["imatrix"]
    kept = _check_gate(record)
    # the printed line says the same
    (printed,) = GATE_LINE.findall(result.stdout)
    assert printed == (
        f"{record['plain']['kl_mean']:.6g}",
        f"{record['imatrix']['kl_mean']:.6g}",
        "with" if kept == "imatrix" else "without",
    )
    matrix_file = matrix_beside(output)
    assert record["file"] == str(matrix_file) and matrix_file.is_file()
    # the file written is the kept candidate, tensor for tensor, and not the other one
    candidates = _candidates(f32_file, tmp_path, "q4_0", matrix_file)
    assert candidates["plain"] != candidates["imatrix"]
    assert _differing(output, candidates[kept]) == []
    assert sorted(p.name for p in tmp_path.glob("m-*")) == sorted(
        [output.name, matrix_file.name, held_out_text_path(output).name]
    )


@pytest.mark.slow
def test_export_q2_k_keeps_whichever_is_lower(
    make_cfg, ckpt: Path, f32_file: Path, tmp_path: Path, capsys
) -> None:
    # q2_k is where a matrix may hurt (llama.cpp's reported regression): no side is assumed
    output = tmp_path / "m-q2_k.gguf"
    cfg = make_cfg("export", [f"ckpt_path={ckpt}", "quantization=q2_k", f"output={output}"])
    _, job = run_as_job(export, cfg, EXPORT_RULES)
    record = job["metrics"]["imatrix"]
    kept = _check_gate(record)
    assert len(GATE_LINE.findall(capsys.readouterr().out)) == 1
    candidates = _candidates(f32_file, tmp_path, "q2_k", matrix_beside(output))
    assert candidates["plain"] != candidates["imatrix"]
    assert _differing(output, candidates[kept]) == []


@pytest.mark.slow
def test_imatrix_none_writes_the_plain_file_and_no_matrix(
    make_cfg, ckpt: Path, f32_file: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "m-q4_0.gguf"
    overrides = [f"ckpt_path={ckpt}", "quantization=q4_0", f"output={output}"]
    cfg = make_cfg("export", [*overrides, "quantize.imatrix=none"])
    _, job = run_as_job(export, cfg, EXPORT_RULES)
    assert job["metrics"]["imatrix"] == {"setting": "none", "file": None, "used": False}
    assert not matrix_beside(output).exists() and not list(tmp_path.rglob("*.imatrix.gguf"))
    printed = capsys.readouterr().out.splitlines()
    assert not [line for line in printed if line.startswith("imatrix")], printed
    plain = quantize_gguf(f32_file, tmp_path / "again.gguf", "q4_0", 2)
    assert _differing(output, _tensors(plain)) == []


@pytest.mark.slow
def test_a_matrix_of_another_model_is_one_line_and_no_file(
    ckpt: Path, f32_file: Path, tmp_path: Path
) -> None:
    # this model's tensor names, another model's widths
    other = ImportanceMatrix(datasets=["other.txt"], chunk_count=1, chunk_size=8)
    for name, width in model_columns(f32_file).items():
        if name.startswith("blk."):
            other.add(name, np.ones((1, width + 64)))
    matrix_file = write_imatrix(tmp_path / "other.imatrix.gguf", other)
    output = tmp_path / "out" / "m-q4_0.gguf"
    result = run_entrypoint(
        "export.py",
        f"ckpt_path={ckpt}",
        "quantization=q4_0",
        f"quantize.imatrix={matrix_file}",
        f"output={output}",
        f"paths.log_dir={tmp_path}",
    )
    line = _one_line_error(result)
    assert f"importance matrix {matrix_file} was made for another model" in line
    assert "columns in it" in line
    assert not output.exists() and not list(tmp_path.rglob(f"*{PARTIAL_SUFFIX}"))
    assert not list(tmp_path.rglob("m-*"))


# ---- generate.py on the exported file


@pytest.mark.slow
def test_a_generate_sweep_gates_every_quantization_of_the_export(
    f32_file: Path, tmp_path: Path
) -> None:
    sweep_dir, jobs = _sweep(
        f32_file, tmp_path, "quantize.imatrix=auto", "llm.quantization=q4_0,q2_k"
    )
    assert len(jobs) == 2
    kept_of = {}
    for job in jobs:
        result = _result(sweep_dir, job)
        record, row = result["imatrix"], job["metrics"]
        # the matrix export.py wrote beside the file
        assert record["matrix"] == str(matrix_beside(f32_file))
        assert record["found"] == "beside the model file"
        kept = kept_of[row["quantization"]] = _check_gate(record)
        other = "plain" if kept == "imatrix" else "imatrix"
        # the row ran the kept file and measured it as the gate did
        assert result["model_path"] == record[kept]["file"] != record[other]["file"]
        assert row["quality/kl_mean"] == pytest.approx(record[kept]["kl_mean"], rel=1e-9)
        assert result["quality"]["text"] == str(held_out_text_path(f32_file))
        # both figures in the row, the kept one flagged
        assert row["imatrix"] is (kept == "imatrix")
        assert row["imatrix/kl_mean_plain"] == record["plain"]["kl_mean"]
        assert row["imatrix/kl_mean_weighted"] == record["imatrix"]["kl_mean"]
        assert row["imatrix/kl_mean_plain_unc"] > 0 and row["imatrix/kl_mean_weighted_unc"] > 0
        # the weighted file is its own file beside the plain one
        plain_file, weighted_file = Path(record["plain"]["file"]), Path(record["imatrix"]["file"])
        assert weighted_file.parent == plain_file.parent
        assert re.fullmatch(
            rf"{re.escape(plain_file.stem)}\.im-[0-9a-f]{{8}}\.gguf", weighted_file.name
        )
    # the summary tables carry both figures
    with (sweep_dir / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        assert (
            float(row["imatrix/kl_mean_plain"]) > 0 and float(row["imatrix/kl_mean_weighted"]) > 0
        )
        assert row["imatrix"] in ("True", "False")
    header = next(
        line for line in (sweep_dir / "summary.md").read_text().splitlines() if "| job |" in line
    )
    assert "| imatrix | imatrix/kl_mean_plain |" in header and "imatrix/kl_mean_weighted" in header
    # summary.png: the discarded file of each row drawn hollow beside the kept one
    assert (sweep_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = speed_and_quality_figure(jobs)
    _, quality_ax = figure.axes
    hollow = [
        c.lines[0].get_xydata()[0][1]
        for c in quality_ax.containers
        if c.lines[0].get_markerfacecolor() == "none"
    ]
    given_up = {
        job["metrics"]["quantization"]: job["metrics"][
            "imatrix/kl_mean_plain"
            if kept_of[job["metrics"]["quantization"]] == "imatrix"
            else "imatrix/kl_mean_weighted"
        ]
        for job in jobs
    }
    assert sorted(hollow) == pytest.approx(sorted(given_up.values()))
    texts = {t.get_text() for t in quality_ax.texts}
    for quantization, kept in kept_of.items():
        side = "without" if kept == "imatrix" else "with"
        assert f"{quantization} {side} imatrix (not kept)" in texts


@pytest.mark.slow
def test_tensor_types_are_a_sweep_axis(f32_file: Path, tmp_path: Path) -> None:
    sweep_dir, jobs = _sweep(
        f32_file, tmp_path, "quantize/tensor_types=none,embeddings_q8", "llm.quantization=q4_0"
    )
    rows = {job["metrics"]["tensor_types"]: (job, _result(sweep_dir, job)) for job in jobs}
    preset = r"^token_embd\.weight$=q8_0 ^output\.weight$=q8_0"
    assert sorted(rows, key=str) == sorted([None, preset], key=str)
    (_, plain), (q8_job, q8) = rows[None], rows[preset]
    plain_types, q8_types = (tensor_types_of(Path(r["model_path"])) for r in (plain, q8))
    assert q8_types["token_embd.weight"] == q8_types["output.weight"] == "q8_0"
    assert plain_types["token_embd.weight"] != "q8_0" and plain_types["output.weight"] != "q8_0"
    # every other tensor as q4_0 has it
    others = {name for name in q8_types if name not in ("token_embd.weight", "output.weight")}
    assert {n: q8_types[n] for n in others} == {n: plain_types[n] for n in others}
    assert q8_types["blk.0.attn_q.weight"] == "q4_0"
    # two files, told apart in the record and the summary
    assert plain["model_path"] != q8["model_path"]
    assert q8["imatrix"]["tensor_types"] == {
        r"^token_embd\.weight$": "q8_0",
        r"^output\.weight$": "q8_0",
    }
    assert q8_job["metrics"]["file_mb"] > rows[None][0]["metrics"]["file_mb"]
    with (sweep_dir / "summary.csv").open() as handle:
        columns = sorted(row["tensor_types"] for row in csv.DictReader(handle))
    assert columns == ["", preset]


@pytest.mark.slow
def test_the_embeddings_entry_comes_from_the_training_loss_and_reaches_llama_quantize(
    f32_file: Path,
    tmp_path: Path,
    llama_tools: Path,  # noqa: F811
) -> None:
    """token_embd.weight, which llama-imatrix cannot collect, has an entry from the gradient of
    the training loss; llama-quantize uses it: its token_embd bytes change and equal ours."""
    matrix_file = matrix_beside(f32_file)
    matrix = read_imatrix(matrix_file)
    entry = matrix.entries["token_embd.weight"]
    assert entry.n_columns == model_columns(f32_file)["token_embd.weight"]
    assert entry.counts[0] == matrix.chunk_count * BLOCK  # one gradient per predicted token
    assert np.all(np.isfinite(entry.sums)) and np.all(entry.sums > 0)
    assert "output.weight" in matrix.entries  # as llama-imatrix --process-output
    theirs = tmp_path / "theirs.gguf"
    done = subprocess.run(
        [llama_tools / "llama-quantize", "--imatrix", matrix_file, f32_file, theirs, "q4_0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"loaded {len(matrix.entries)} importance matrix entries" in done.stdout
    without_embeddings = ImportanceMatrix(
        {n: e for n, e in matrix.entries.items() if n != "token_embd.weight"},
        matrix.datasets,
        matrix.chunk_count,
        matrix.chunk_size,
    )
    candidates = {
        "ours": quantize_gguf(f32_file, tmp_path / "ours.gguf", "q4_0", 2, imatrix=matrix),
        "blocks only": quantize_gguf(
            f32_file, tmp_path / "blocks.gguf", "q4_0", 2, imatrix=without_embeddings
        ),
    }
    theirs_tensors = _tensors(theirs)
    assert _differing(candidates["ours"], theirs_tensors) == []
    assert _differing(candidates["blocks only"], theirs_tensors) == ["token_embd.weight"]
