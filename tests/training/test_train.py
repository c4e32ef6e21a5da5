"""train() as train.py calls it: real short trainings on the bundled digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml_engine.training.evaluate import evaluate
from ml_engine.training.rules import TRAIN_RULES
from ml_engine.training.train import train
from ml_engine.training.vision.module import ClassifierModule, load_classifier
from tests.conftest import run_as_job

METRIC_KEYS = {
    "test/acc",
    "test/loss",
    "val/acc_best",
    "best_ckpt",
    "data_source",
    "epochs_run",
    "wall_s",
}


@pytest.mark.parametrize("model", ["cnn_mnist", "mlp_mnist"])
def test_fast_dev_run_per_network(make_cfg, model: str) -> None:
    cfg = make_cfg("train", [f"model={model}", "debug=fdr"])
    metrics = train(cfg)
    assert metrics["data_source"] == "bundled"
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_short_training_learns_and_keeps_the_best_checkpoint(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("train", ["trainer.max_epochs=3", "model=mlp_mnist", "logger=csv"], True)
    optimized, record = run_as_job(train, cfg, TRAIN_RULES)
    metrics = record["metrics"]

    assert record["status"] == "ok" and record["error"] is None
    assert set(metrics) >= METRIC_KEYS
    assert metrics["test/acc"] > 0.85  # chance is 0.10
    assert metrics["epochs_run"] == 3
    assert optimized == pytest.approx(metrics[cfg.optimized_metric])  # what a sweeper gets

    best = Path(metrics["best_ckpt"])
    assert best == tmp_path / "checkpoints" / "best.ckpt"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    state = torch.load(best, map_location="cpu", weights_only=True)
    val_history = _csv_column(tmp_path, "val/acc")
    assert metrics["val/acc_best"] == pytest.approx(max(val_history))
    # no monitor (Lightning's default): best.ckpt is the network after the last epoch
    assert state["epoch"] == len(val_history) - 1 == 2

    restored = ClassifierModule.load_from_checkpoint(best)  # from the checkpoint alone
    assert restored.hparams.net["name"] == "mlp_mnist"
    # the original engine's safety net: channel-less batches are reshaped
    assert restored(torch.zeros(4, 28, 28)).shape == (4, 10)


@pytest.mark.parametrize(("later_wins_ties", "kept_epoch"), [(True, 2), (False, 0)])
def test_best_checkpoint_of_tied_epochs(tmp_path: Path, later_wins_ties: bool, kept_epoch: int):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from ml_engine.training.callbacks import AtomicModelCheckpoint

    class SameScoreEveryEpoch(BoringModel):
        def on_validation_epoch_end(self) -> None:
            self.log("val/acc", 0.5)

    checkpoint = AtomicModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor="val/acc", mode="max",
        enable_version_counter=False, later_wins_ties=later_wins_ties,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[checkpoint],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(SameScoreEveryEpoch())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]
    saved = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == kept_epoch


def test_later_wins_ties_takes_only_true_or_false(tmp_path: Path) -> None:
    from ml_engine.errors import UserError
    from ml_engine.training.callbacks import AtomicModelCheckpoint

    with pytest.raises(UserError, match=r"later_wins_ties='maybe' is not valid; expected true or"):
        AtomicModelCheckpoint(dirpath=tmp_path, later_wins_ties="maybe")


def _csv_column(run_dir: Path, column: str) -> list[float]:
    import csv

    (metrics_csv,) = run_dir.rglob("metrics.csv")
    with metrics_csv.open() as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]


def test_early_stopping_stops_before_max_epochs(make_cfg) -> None:
    cfg = make_cfg(
        "train",
        [
            "model=mlp_mnist",
            "trainer.max_epochs=20",
            "trainer.limit_train_batches=3",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=0.5",  # no epoch can improve this much
            "test=false",
        ],
    )
    metrics = train(cfg)
    assert metrics["epochs_run"] == 2  # the first epoch sets the bar, one more without gain


def test_eval_reproduces_the_training_test_metric(trained_classifier, make_cfg) -> None:
    trained = trained_classifier
    eval_cfg = make_cfg("eval", [f"ckpt_path={trained['best_ckpt']}"])
    evaluated = run_as_job(evaluate, eval_cfg, TRAIN_RULES)[1]["metrics"]
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-5)
    assert evaluated["ckpt_path"] == trained["best_ckpt"]


def test_checkpoint_loads_with_weights_only_unpickler(trained_classifier) -> None:
    model = load_classifier(trained_classifier["best_ckpt"])
    assert not model.training
    # cnn_mnist trains in NHWC (model.channels_last); the same weights give the same outputs
    # in the default layout, so predict/serve code that ignores the layout stays correct
    conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.hparams.channels_last
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = ClassifierModule(**{**model.hparams, "channels_last": False}).eval()
    nchw.load_state_dict(model.state_dict())
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(images), nchw(images), rtol=1e-4, atol=1e-5)
