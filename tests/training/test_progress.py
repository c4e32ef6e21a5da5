"""With stdout redirected (CI, nohup, schedulers) training prints plain progress lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_entrypoint

BOX_DRAWING = re.compile("[\u2500-\u259f]")  # rich's bars, panels and tables


@pytest.mark.slow
def test_redirected_training_prints_plain_progress_lines(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py",
        f"paths.log_dir={tmp_path}",
        "datamodule.source=bundled",
        "trainer.accelerator=cpu",
        "extras.print_config=false",
        "logger=none",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=8",
        "trainer.limit_val_batches=2",
        "test=false",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    step = re.compile(
        r"^epoch (\d)/2 step (\d+)/8 \(\d+%\) [\d.]+ steps/s \d+ samples/s train/loss_step=[\d.]+$"
    )
    steps = [m.groups() for m in map(step.match, lines) if m]
    assert steps == [(e, s) for e in "12" for s in ("2", "4", "6")], result.stdout[-3000:]
    done = [line for line in lines if re.match(r"^epoch \d/2 done: 8 steps in ", line)]
    assert len(done) == 2, result.stdout[-3000:]
    for line in done:
        assert re.search(r"[\d.]+ steps/s \d+ samples/s", line)
        assert re.search(r"train/loss=[\d.]+ ", line) and re.search(r"val/acc=[\d.]+ ", line)
    assert not BOX_DRAWING.search(result.stdout), result.stdout[-3000:]


def test_progress_style_is_forced_or_chosen_by_the_terminal() -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    from ml_engine.errors import UserError
    from ml_engine.training.callbacks import PlainProgressBar, progress_bar

    assert isinstance(progress_bar(style="plain"), PlainProgressBar)
    assert isinstance(progress_bar(style="rich"), RichProgressBar)
    # pytest captures stdout: not a terminal
    assert isinstance(progress_bar(style="auto"), PlainProgressBar)
    with pytest.raises(UserError, match="accepted: auto, rich, plain"):
        progress_bar(style="fancy")
