"""quantize.imatrix=auto|none|<file> in generate.py (llm/imatrix_gate.py): the rule that keeps the
lower-KLD file, the setting's check, the names of variant files, bad input in one line before any
work, and a matrix computed by llama.cpp on quantize.calibration_text for a float file without
one beside it.

The sweeps on a trained model's exported file (a matrix beside it, q4_0/q2_k gated, the
tensor_types axis) are in tests/training/lm/test_export_imatrix.py, where that model is a fixture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ml_engine.errors import UserError
from ml_engine.llm.imatrix import ImportanceMatrix, matrix_beside, read_imatrix, write_imatrix
from ml_engine.llm.imatrix_gate import AUTO, CALIBRATION_DIR, NONE, check_setting, lower_kld
from ml_engine.llm.models import ensure_model_file, model_path
from ml_engine.llm.variants import Variant, file_digest
from ml_engine.training.lm.text_data import bundled_corpus_path
from tests.llm.conftest import generate_cli, last_line, tiny_model_cfg

CALIBRATION_CTX = 64
CALIBRATION_CHUNKS = 4


def _figures(plain: float, weighted: float) -> dict[str, dict[str, float]]:
    return {"plain": {"kl_mean": plain}, "imatrix": {"kl_mean": weighted}}


def _one_line(result) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


# ---- the rules


def test_the_lower_mean_kld_is_kept_and_plain_wins_a_tie() -> None:
    assert lower_kld(_figures(0.02, 0.01)) == "imatrix"
    assert lower_kld(_figures(0.01, 0.02)) == "plain"
    assert lower_kld(_figures(0.01, 0.01)) == "plain"
    # the order the figures come in decides nothing
    reversed_tie = {"imatrix": {"kl_mean": 0.5}, "plain": {"kl_mean": 0.5}}
    assert lower_kld(reversed_tie) == "plain"
    assert lower_kld({"imatrix": {"kl_mean": 1e-9}, "plain": {"kl_mean": 2e-9}}) == "imatrix"


def test_check_setting_takes_auto_none_or_an_existing_file(tmp_path: Path) -> None:
    assert check_setting("auto") == AUTO and check_setting("none") == NONE
    assert check_setting(None) == NONE and check_setting(False) == NONE
    matrix = tmp_path / "m.imatrix.gguf"
    matrix.write_bytes(b"x")
    assert check_setting(str(matrix)) == str(matrix)
    assert check_setting(matrix) == str(matrix)
    for wrong in (str(tmp_path / "missing.gguf"), "Auto", "yes"):
        with pytest.raises(UserError) as caught:
            check_setting(wrong)
        message = str(caught.value)
        assert message.startswith(f"quantize.imatrix={wrong}: no such file") and "\n" not in message
        assert "auto, none" in message


def test_variant_files_are_named_beside_the_plain_one() -> None:
    plain = Path("/models/tiny-q4_0.gguf")
    matrix = ImportanceMatrix()
    key_a, key_b = "a1b2c3d4" + "0" * 56, "ffff0000" + "1" * 56
    assert Variant().path_for(plain) == plain
    assert Variant(matrix, "m.gguf", key_a).path_for(plain) == Path(
        "/models/tiny-q4_0.im-a1b2c3d4.gguf"
    )
    # another matrix, another file
    assert Variant(matrix, "m.gguf", key_b).path_for(plain).name == "tiny-q4_0.im-ffff0000.gguf"
    types = (("attn_v", "q6_k"),)
    tt = hashlib.sha1(b"attn_v=q6_k").hexdigest()[:8]
    assert Variant(tensor_types=types).path_for(plain).name == f"tiny-q4_0.tt-{tt}.gguf"
    both = Variant(matrix, "m.gguf", key_a, types)
    assert both.path_for(plain).name == f"tiny-q4_0.im-a1b2c3d4.tt-{tt}.gguf"
    # the plain candidate of a gated variant keeps the types, drops the matrix
    assert both.without_imatrix().path_for(plain).name == f"tiny-q4_0.tt-{tt}.gguf"
    # llama.cpp applies the first matching pattern: another order is another file
    two = (("attn_v", "q6_k"), ("attn", "q8_0"))
    assert Variant(tensor_types=two).path_for(plain) != Variant(tensor_types=two[::-1]).path_for(
        plain
    )


# ---- bad input: one line, before any model file is made


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "quantize.imatrix=/no/such.gguf",
            "error: quantize.imatrix=/no/such.gguf: no such file; accepted: auto, none, or the "
            "path of an importance matrix",
        ),
        ("+quantize.tensor_types.attn_v=q7_k", "error: quantize.tensor_types={'attn_v': 'q7_k'}"),
        (
            "quantize.calibration_text=/missing",
            "error: quantize.calibration_text='/missing' is not valid; expected an existing "
            "UTF-8 text file",
        ),
    ],
    ids=["imatrix-missing", "tensor-type-unknown", "calibration-text-missing"],
)
def test_bad_quantize_settings_are_one_line_before_any_work(
    override: str, expected: str, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    result = generate_cli(
        "llm.quantization=q4_0",
        "quantize.imatrix=auto",
        override,
        models_dir=models,
        outputs=tmp_path / "out",
    )
    line = _one_line(result)
    assert line.startswith(expected), line
    if "tensor_types" in override:
        assert "q4_k" in line and "q7_k" in line  # the accepted types are listed
    assert not models.exists()  # nothing was made or loaded


def test_a_file_that_is_no_matrix_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("not a matrix")
    result = generate_cli(
        "llm.quantization=q4_0",
        f"quantize.imatrix={text}",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "out",
    )
    line = _one_line(result)
    assert line.startswith(f"error: importance matrix {text} is not a GGUF file"), line
    assert not (tmp_path / "models").exists()


# ---- a matrix computed by llama.cpp on calibration text


def test_calibration_text_computes_a_cached_matrix_and_gates(tmp_path: Path) -> None:
    models = tmp_path / "models"
    f32 = ensure_model_file(tiny_model_cfg(), "f32", models).path
    assert not matrix_beside(f32).exists()  # nothing beside the float file to find
    calibration = tmp_path / "calibration.txt"
    text = bundled_corpus_path().read_text(encoding="utf-8")[:20000]
    calibration.write_text(text, encoding="utf-8")
    # q8_0 ignores an importance matrix: the same bytes both ways, a tie the plain file wins
    result = generate_cli(
        "llm.quantization=q4_0,q8_0",
        "quantize.imatrix=auto",
        f"quantize.calibration_text={calibration}",
        f"quantize.calibration_n_ctx={CALIBRATION_CTX}",
        f"quantize.calibration_chunks={CALIBRATION_CHUNKS}",
        models_dir=models,
        outputs=tmp_path / "out",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = Path(last_line(result.stdout).removeprefix("summary: ")).parent
    jobs = json.loads((sweep_dir / "summary.json").read_text())["jobs"]
    assert all(job["status"] == "ok" for job in jobs), [job["error"] for job in jobs]
    records = {}
    for job in jobs:
        result_json = json.loads((sweep_dir / str(job["job"]) / "result.json").read_text())
        records[job["metrics"]["quantization"]] = (result_json, job["metrics"])
    assert sorted(records) == ["q4_0", "q8_0"]
    # one matrix, computed once for both jobs, cached under models_dir/.imatrix
    (cached,) = (models / CALIBRATION_DIR).iterdir()
    assert cached.name.startswith(f"{f32.stem}.") and cached.name.endswith(".imatrix.gguf")
    matrix = read_imatrix(cached)
    assert matrix.datasets == [str(calibration)]
    assert (matrix.chunk_size, matrix.chunk_count) == (CALIBRATION_CTX, CALIBRATION_CHUNKS)
    assert all(name.startswith(("blk.", "output")) for name in matrix.entries)
    assert len([n for n in matrix.entries if n.startswith("blk.")]) == 2 * 7  # two layers
    for quantization, (result_json, row) in records.items():
        record = result_json["imatrix"]
        assert record["found"] == "computed on quantize.calibration_text", record
        assert record["matrix"] == str(cached)
        plain, weighted = record["plain"]["kl_mean"], record["imatrix"]["kl_mean"]
        assert record["kept"] == ("imatrix" if weighted < plain else "plain")
        assert result_json["model_path"] == record[record["kept"]]["file"]
        assert row["quality/kl_mean"] == pytest.approx(record[record["kept"]]["kl_mean"])
        # the weighted file is named after the matrix it was made with
        plain_name = model_path(tiny_model_cfg(), quantization, models).stem
        assert Path(record["imatrix"]["file"]).name == (
            f"{plain_name}.im-{file_digest(cached)[:8]}.gguf"
        )
    q4, q8 = records["q4_0"][0]["imatrix"], records["q8_0"][0]["imatrix"]
    assert q4["plain"]["kl_mean"] != q4["imatrix"]["kl_mean"]  # the matrix changed q4_0
    assert q8["plain"]["kl_mean"] == q8["imatrix"]["kl_mean"] and q8["kept"] == "plain"

    # quantize.imatrix=<that file>: the weighted file, no gate
    given = generate_cli(
        "llm.quantization=q4_0",
        f"quantize.imatrix={cached}",
        models_dir=models,
        outputs=tmp_path / "given",
    )
    assert given.returncode == 0, given.stderr[-3000:]
    run_dir = Path(last_line(given.stdout).removeprefix("run_dir: "))
    result_json = json.loads((run_dir / "result.json").read_text())
    record = result_json["imatrix"]
    assert record["setting"] == str(cached) and record["used"] is True
    assert "kept" not in record and "plain" not in record
    assert result_json["model_path"] == q4["imatrix"]["file"]
    assert list((models / CALIBRATION_DIR).iterdir()) == [cached]  # still the one matrix


def test_a_matrix_of_another_model_fails_the_row_in_one_line(tmp_path: Path) -> None:
    models = tmp_path / "models"
    ensure_model_file(tiny_model_cfg(), "f32", models)
    other = ImportanceMatrix(datasets=["other.txt"], chunk_count=1, chunk_size=8)
    other.add("blk.0.attn_q.weight", np.ones((1, 128)))  # tiny's is 256 wide
    matrix_file = write_imatrix(tmp_path / "other.imatrix.gguf", other)
    result = generate_cli(
        "llm.quantization=q4_0",
        f"quantize.imatrix={matrix_file}",
        models_dir=models,
        outputs=tmp_path / "out",
    )
    line = _one_line(result)
    assert f"importance matrix {matrix_file} was made for another model" in line, line
    assert "blk.0.attn_q.weight has 128 columns in it, 256 in this model" in line
    assert not list(models.glob("*q4_0*"))
