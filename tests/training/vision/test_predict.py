"""predict.py on real digit images written from the bundled MNIST digits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_engine.training.vision.images import to_mnist_digit
from tests.conftest import run_dir_of, run_entrypoint
from tests.test_cli_errors import assert_one_line_error


@pytest.fixture
def trained_checkpoint(trained_classifier) -> Path:
    """The session's cnn_mnist, trained for a few epochs on the bundled digits."""
    return Path(trained_classifier["best_ckpt"])


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_predict_folder_of_real_digits(
    trained_checkpoint: Path, digit_pngs, tmp_path: Path
) -> None:
    folder, expected = digit_pngs
    output = tmp_path / "out" / "preds.csv"
    result = run_entrypoint(
        "predict.py",
        f"ckpt_path={trained_checkpoint}",
        f"input={folder}",
        f"output={output}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("run_dir: ")
    rows = read_rows(output)
    assert list(rows[0]) == ["path", "prediction", "confidence"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(expected) == 12
    truth = {name: int(name[1]) for name in by_name}
    correct = sum(int(by_name[n]["prediction"]) == truth[n] for n in by_name)
    assert correct >= 11, rows  # digits it may have trained on, plus resized/inverted photos
    assert all(0.0 < float(r["confidence"]) <= 1.0 for r in rows)


@pytest.mark.slow
def test_predict_single_file_and_unreadable_image(
    trained_checkpoint: Path, digit_pngs, tmp_path: Path
) -> None:
    folder, _ = digit_pngs
    output = tmp_path / "one.csv"
    result = run_entrypoint(
        "predict.py",
        f"ckpt_path={trained_checkpoint}",
        f"input={folder / 'd7_paper.jpg'}",
        f"output={output}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["prediction"] for r in read_rows(output)] == ["7"]

    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    broken_output = tmp_path / "broken.csv"
    result = run_entrypoint(
        "predict.py",
        f"ckpt_path={trained_checkpoint}",
        f"input={folder}",
        f"output={broken_output}",
        f"paths.log_dir={tmp_path}",
    )
    assert_one_line_error(result, "cannot read image", "broken.png")
    assert not broken_output.exists() and not list(tmp_path.glob(".broken.csv*"))


@pytest.mark.slow
def test_predict_folder_reports_skipped_files_and_writes_into_the_run_dir(
    trained_checkpoint: Path, digit_pngs, tmp_path: Path
) -> None:
    folder, expected = digit_pngs
    (folder / "notes.txt").write_text("not a digit")
    (folder / "labels.csv").write_text("name,label\n")
    (folder / "more").mkdir()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = run_entrypoint(
        "predict.py",
        f"ckpt_path={trained_checkpoint}",
        f"input={folder}",
        f"paths.log_dir={tmp_path / 'outputs'}",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1, result.stdout[-2000:]
    assert "2 file(s) without an image extension" in skipped[0]
    assert "labels.csv" in skipped[0] and "notes.txt" in skipped[0] and ".png" in skipped[0]
    assert "1 subfolder(s)" in skipped[0]
    run_dir = run_dir_of(result)
    assert run_dir.parent == tmp_path / "outputs" / "predict" / "runs"
    assert len(read_rows(run_dir / "predictions.csv")) == len(expected)
    assert list(cwd.iterdir()) == []  # nothing lands where the command ran


def test_mnist_style_conversion_of_a_photo(bundled_digits) -> None:
    images, _ = bundled_digits
    digit = images[123]
    paper = Image.fromarray(255 - digit).resize((200, 160))  # dark ink on light paper, stretched
    converted = to_mnist_digit(paper, invert="auto")
    assert converted.shape == (28, 28) and converted.dtype == np.uint8
    assert converted[0].max() < 30 and converted.max() > 200  # black border, white ink
    ys, xs = np.nonzero(converted > 50)
    assert 9 <= ys.mean() <= 18 and 9 <= xs.mean() <= 18  # centred like MNIST
    assert np.array_equal(to_mnist_digit(Image.fromarray(digit), invert=False), digit)


DEAD_PID = 2**22 + 7  # above Linux's largest pid: no process has it


@pytest.mark.slow
def test_predict_refuses_outputs_that_are_no_regular_file(
    trained_checkpoint: Path, digit_pngs, tmp_path: Path
) -> None:
    import os

    folder, _ = digit_pngs
    target = tmp_path / "kept.csv"
    target.write_text("mine\n")
    os.symlink(target, tmp_path / "link.csv")
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "folder.csv").mkdir()
    for name, kind in (
        ("folder.csv", "a directory"),
        ("link.csv", "a symlink"),
        ("fifo.csv", "a FIFO"),
    ):
        result = run_entrypoint(
            "predict.py",
            f"ckpt_path={trained_checkpoint}",
            f"input={folder}",
            f"output={tmp_path / name}",
            f"paths.log_dir={tmp_path / 'logs'}",
        )
        assert_one_line_error(result, f"output={tmp_path / name} is {kind}")
    assert (tmp_path / "link.csv").is_symlink() and target.read_text() == "mine\n"
    assert (tmp_path / "folder.csv").is_dir() and not list(tmp_path.glob(".*.partial"))


@pytest.mark.slow
def test_predict_removes_what_a_killed_predict_left(
    trained_checkpoint: Path, digit_pngs, tmp_path: Path
) -> None:
    folder, _ = digit_pngs
    left = tmp_path / f".old.csv.{DEAD_PID}.partial"
    left.write_text("half a csv")
    result = run_entrypoint(
        "predict.py",
        f"ckpt_path={trained_checkpoint}",
        f"input={folder}",
        f"output={tmp_path / 'new.csv'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not left.exists() and (tmp_path / "new.csv").is_file()
