"""Mistakes a user can make end in one line, a non-zero exit and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CLI_TEST_OVERRIDES, run_entrypoint


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def common(tmp_path: Path) -> list[str]:
    return [*CLI_TEST_OVERRIDES, f"paths.log_dir={tmp_path}", "logger=none"]


def eval_common(tmp_path: Path) -> list[str]:
    return [f"paths.log_dir={tmp_path}", "datamodule.source=bundled", "extras.print_config=false"]


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("model=resnet", ("unknown model 'resnet'", "cnn_mnist, mlp_mnist")),
        ("datamodule=cifar", ("unknown datamodule 'cifar'", "mnist")),
        ("trainer=tpu", ("unknown trainer 'tpu'", "ddp_cpu")),
        ("logger=wandb", ("unknown logger 'wandb'", "tensorboard")),
        ("model.optimizer.lr=abc", ("model.optimizer.lr='abc'", "a number > 0")),
        ("datamodule.batch_size=0", ("datamodule.batch_size=0", "an integer ≥ 1")),
        ("datamodule.source=kaggle", ("datamodule.source='kaggle'", "auto, torchvision, bundled")),
        ("model.net.name=resnet", ("unknown network 'resnet'", "cnn_mnist")),
        ("trainer.accelerator=mps", ("trainer.accelerator='mps'", "no Apple MPS", "cpu")),
        ("trainer=gpu", ("trainer.accelerator='gpu'", "no CUDA GPU", "available here: auto, cpu")),
        ("trainer.accelerator=tpu9", ("not known", "auto, cpu")),
    ],
)
def test_train_user_errors(tmp_path: Path, override: str, fragments: tuple[str, ...]) -> None:
    overrides = common(tmp_path)
    if override.startswith("trainer"):  # let the trainer option choose its own accelerator
        overrides.remove("trainer.accelerator=cpu")
    result = run_entrypoint("train.py", *overrides, override)
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))


def test_full_traceback_when_asked(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py", *common(tmp_path), "model.optimizer.lr=abc", env={"HYDRA_FULL_ERROR": "1"}
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    result = run_entrypoint("eval.py", *eval_common(tmp_path), f"ckpt_path={missing}")
    assert_one_line_error(result, "checkpoint not found", str(missing))


def test_resume_from_missing_checkpoint(tmp_path: Path) -> None:
    result = run_entrypoint("train.py", *common(tmp_path), f"ckpt_path={tmp_path}/last.ckpt")
    assert_one_line_error(result, "checkpoint not found")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    corrupt = tmp_path / "best.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    result = run_entrypoint(
        "predict.py", f"paths.log_dir={tmp_path}", f"ckpt_path={corrupt}", f"input={tmp_path}"
    )
    assert_one_line_error(result, "could not load checkpoint", str(corrupt))


def test_eval_without_ckpt_path(tmp_path: Path) -> None:
    result = run_entrypoint("eval.py", *eval_common(tmp_path))
    assert_one_line_error(result, "ckpt_path")
