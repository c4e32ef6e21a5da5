"""Classifier and language-model runs share ``outputs/train/runs``: ``ckpt_path=last`` is the
newest run of the configured model's kind, a checkpoint of the other kind is named as the wrong
kind in one line by every entrypoint, and a text too short for its split is refused before any
training (issue 24, points 5 and 7)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from ml_engine.errors import UserError
from ml_engine.training.lm.text_data import TextDataModule, min_corpus_chars
from ml_engine.training.train import train
from tests.conftest import compose_config, ok_job_records, run_entrypoint, shrink

QUIET = (
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
    "logger=none",
)
# experiment=shakespeare_char shrunk to a few seconds: 2 steps of a one-layer, 32-wide llama
TINY_LM = (
    "experiment=shakespeare_char",
    "datamodule.max_chars=4000",
    "datamodule.block_size=32",
    "datamodule.train_batches=2",
    "model.net.n_layer=1",
    "model.net.n_embd=32",
    "model.net.n_ff=64",
    "model.sample_tokens=8",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",
)
# the README's short text: 141 bytes of Hamlet
HAMLET = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take\n"
)


def _train_run(overrides: tuple[str, ...], log_dir: Path, name: str) -> Path:
    """A real training run at ``<log_dir>/train/runs/<name>``, as train.py lays it out;
    returns its ``last.ckpt``."""
    cfg = shrink(compose_config("train", list(overrides)), log_dir / "train" / "runs" / name)
    with open_dict(cfg):
        cfg.paths.log_dir = str(log_dir)
    try:
        last = Path(train(cfg)["last_ckpt"])
    finally:
        GlobalHydra.instance().clear()
    assert last.is_file()
    return last


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, trained_classifier) -> dict[str, Path]:
    """One outputs folder: a language-model run, then a newer MNIST run (the session's trained
    classifier, copied in: as a new user who tried both); values are their ``last.ckpt``."""
    log_dir = tmp_path_factory.mktemp("outputs")
    lm = _train_run(TINY_LM, log_dir, "2026-01-01_00-00-00_lm")
    classifier_run = Path(trained_classifier["last_ckpt"]).parent.parent
    mnist_run = log_dir / "train" / "runs" / "2026-01-01_00-00-01_mnist"
    shutil.copytree(classifier_run, mnist_run)
    mnist = mnist_run / "checkpoints" / "last.ckpt"
    # newest by modification time, as ckpt_path=last orders them, whatever the clock's grain
    stamp = lm.stat().st_mtime + 60
    os.utime(mnist, (stamp, stamp))
    return {"log_dir": log_dir, "lm": lm, "mnist": mnist}


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


# ---- ckpt_path=last


@pytest.mark.slow
def test_last_resumes_the_newest_language_model_run_after_an_mnist_run(runs) -> None:
    result = run_entrypoint(
        "train.py",
        *TINY_LM,
        *QUIET,
        "ckpt_path=last",
        "trainer.max_epochs=2",
        f"paths.log_dir={runs['log_dir']}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"resuming from {runs['lm']}" in output
    assert "resuming at step 2: OneCycleLR re-planned for 4 total steps (was 2)" in output


@pytest.mark.slow
def test_last_with_only_a_classifier_run_names_it_in_one_line(runs, tmp_path: Path) -> None:
    classifier_run = runs["mnist"].parent.parent
    runs_dir = tmp_path / "train" / "runs"
    shutil.copytree(classifier_run, runs_dir / classifier_run.name)
    copied = runs_dir / classifier_run.name / "checkpoints" / "last.ckpt"
    result = run_entrypoint(
        "train.py", *TINY_LM, *QUIET, "ckpt_path=last", f"paths.log_dir={tmp_path}"
    )
    assert _one_line_error(result) == (
        f"error: ckpt_path=last: no CausalLMModule run (a language model) under {runs_dir}; "
        f"the newest last.ckpt, {copied}, is a ClassifierModule checkpoint (an image "
        "classifier); train one first (python train.py experiment=shakespeare_char) or give "
        "ckpt_path=<path to a .ckpt>"
    )
    assert sorted(p.name for p in runs_dir.iterdir()) == [classifier_run.name]  # no new run dir


# ---- the wrong kind, in every entrypoint


def _wrong_kind_cases(runs: dict[str, Path], images: Path) -> dict[str, tuple[tuple, str]]:
    lm, mnist = runs["lm"], runs["mnist"]
    classifier = "ClassifierModule checkpoint (an image classifier), the wrong kind for"
    language = "CausalLMModule checkpoint (a language model), the wrong kind for"
    return {
        "train resume": (
            ("train.py", *TINY_LM, *QUIET, f"ckpt_path={mnist}"),
            f"error: {mnist} is a {classifier} resuming model=llama_char: it takes a "
            "CausalLMModule checkpoint (a language model, as python train.py "
            "experiment=shakespeare_char writes)",
        ),
        "export": (
            ("export.py", f"ckpt_path={mnist}"),
            f"error: {mnist} is a {classifier} export.py: it takes a CausalLMModule checkpoint "
            "(a language model, as python train.py experiment=shakespeare_char writes)",
        ),
        "predict": (
            ("predict.py", f"ckpt_path={lm}", f"input={images}"),
            f"error: {lm} is a {language} predict.py: it takes a ClassifierModule checkpoint "
            "(an image classifier, as python train.py model=<cnn_mnist|…> writes)",
        ),
        "eval on digits": (
            ("eval.py", *QUIET[:1], f"ckpt_path={lm}", "datamodule=mnist"),
            f"error: {lm} is a {language} eval.py with datamodule=mnist: it is evaluated on "
            "datamodule=text; leave datamodule out to use the one it was trained with",
        ),
        "eval on text": (
            ("eval.py", *QUIET[:1], f"ckpt_path={mnist}", "datamodule=text"),
            f"error: {mnist} is a {classifier} eval.py with datamodule=text: it is evaluated on "
            "datamodule=image_folder, datamodule=mnist, datamodule=torchvision; leave "
            "datamodule out to use the one it was trained with",
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["train resume", "export", "predict", "eval on digits", "eval on text"]
)
def test_a_checkpoint_of_the_wrong_kind_is_one_line(
    runs, digit_pngs, tmp_path: Path, case: str
) -> None:
    (script, *overrides), expected = _wrong_kind_cases(runs, digit_pngs[0])[case]
    result = run_entrypoint(script, *overrides, f"paths.log_dir={tmp_path}")
    assert _one_line_error(result) == expected
    assert not ok_job_records(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name != "digits"]  # no run dir left


# ---- a text too short to learn from


def test_the_split_needs_one_whole_window_on_each_side(tmp_path: Path) -> None:
    text = (HAMLET * 10)[:700]
    for block_size, val_fraction in ((64, 0.1), (32, 0.1), (16, 0.5)):
        needed = min_corpus_chars(block_size, val_fraction)
        path = tmp_path / f"corpus-{block_size}.txt"
        path.write_text(text[:needed])
        fits = TextDataModule(path=str(path), block_size=block_size, val_fraction=val_fraction)
        fits.prepare_data()
        fits.setup()
        assert min(len(split) for split in fits.splits) == block_size + 1

        path.write_text(text[: needed - 1])
        short = TextDataModule(path=str(path), block_size=block_size, val_fraction=val_fraction)
        with pytest.raises(UserError, match=f"at least {needed:,} characters"):
            short.prepare_data()
    assert min_corpus_chars(64, 0.1) == 646  # the README's figure for experiment=shakespeare_char


@pytest.mark.slow
def test_a_141_byte_text_is_refused_before_training_and_leaves_no_run(tmp_path: Path) -> None:
    corpus = tmp_path / "hamlet.txt"
    corpus.write_text(HAMLET)
    assert corpus.stat().st_size == 141
    outputs = tmp_path / "outputs"
    # one step each, so that the old code, which trained on it, ends the test quickly
    result = run_entrypoint(
        "train.py",
        "experiment=shakespeare_char",
        f"datamodule.path={corpus}",
        "datamodule.block_size=64",  # the figures below (the experiment's is 128)
        "datamodule.train_batches=1",
        "trainer.max_epochs=1",
        f"paths.log_dir={outputs}",
    )
    assert _one_line_error(result) == (
        f"error: datamodule.path: {corpus} has 141 characters, too few for block_size=64 with "
        "val_fraction=0.1: the training and validation splits each need one whole window of 65 "
        "characters (block_size + 1) and would get 127 and 14; give a text of at least 646 "
        "characters or a smaller datamodule.block_size"
    )
    assert "Epoch" not in result.stdout
    assert not outputs.exists() or not any(outputs.iterdir())
