"""One LightningModule for any registered classification network."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ml_engine.training.batches import plain_container
from ml_engine.training.checkpoints import load_module
from ml_engine.training.optimizers import ConfiguredOptimizers
from ml_engine.training.registry import build_network, register_module

# the built-in networks register themselves on import
from ml_engine.training.vision import networks, torchvision_nets  # noqa: F401
from ml_engine.training.vision.image_data import MNIST_MEAN, MNIST_STD, mnist_spec


def to_model_input(
    images: Tensor, mean: Tensor | float = MNIST_MEAN, std: Tensor | float = MNIST_STD
) -> Tensor:
    """uint8 or [0, 1] float images {N,C,H,W} (or channel-less {N,H,W}) → normalized floats.

    Inputs are raw intensities so that a checkpoint alone (which holds ``mean`` and ``std``, per
    channel as {1,C,1,1}) is enough to predict on new images.
    """
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if images.dim() == 3:  # the original engine's safety net for channel-less batches
        images = images.unsqueeze(1)
    return (images - mean) / std


@register_module
class ClassifierModule(ConfiguredOptimizers):
    """Cross-entropy classification with torchmetrics accuracy and a configurable optimizer.

    ``optimizer`` and ``scheduler`` are Hydra nodes with ``_partial_: true``, completed in
    ``configure_optimizers`` (``ConfiguredOptimizers``).
    """

    # what checkpoint errors say of this kind (training/checkpoints.py), and its data
    description: ClassVar[str] = "an image classifier"
    train_command: ClassVar[str] = "python train.py model=<cnn_mnist|…>"
    reads_text: ClassVar[bool] = False

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
        num_classes: int = 10,
        data: dict[str, Any] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        # the datamodule's data spec (image_data.data_spec); checkpoints from before it
        # were MNIST digit models
        data = plain_container(data) or mnist_spec(num_classes)
        num_classes = len(data["class_names"])
        self.save_hyperparameters(
            {
                "net": plain_container(net),
                "optimizer": plain_container(optimizer),
                "scheduler": plain_container(scheduler),
                "scheduler_interval": scheduler_interval,
                "label_smoothing": label_smoothing,
                "num_classes": num_classes,
                "data": data,
                "channels_last": channels_last,
            }
        )
        net_kwargs = dict(self.hparams.net)
        self.net = build_network(
            net_kwargs.pop("name"),
            supplied={
                "num_classes": num_classes,
                "in_channels": data["channels"],
                "image_size": data["image_size"],
            },
            **net_kwargs,
        )
        # NHWC: oneDNN's convolutions run a small CNN's step ~20 % faster on CPU (bench/README)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        if net_kwargs.get("pretrained"):
            # the weights now live in this module's state_dict: rebuilding it from a checkpoint
            # must not look for the pretrained file again
            self.hparams.net["pretrained"] = False
        # not persistent: the statistics are hyperparameters, and older state_dicts lack them
        mean, std = torch.tensor(data["mean"]), torch.tensor(data["std"])
        self.register_buffer("input_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", std.view(1, -1, 1, 1), persistent=False)

        # no per-batch input validation: preds are our own argmax, targets the datamodule's
        # labels; checking them costs more per step than the small networks' update
        accuracy = {"average": "micro", "validate_args": False}
        self.train_acc = MulticlassAccuracy(num_classes, **accuracy)
        self.val_acc = MulticlassAccuracy(num_classes, **accuracy)
        self.test_acc = MulticlassAccuracy(num_classes, **accuracy)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.data["class_names"])

    def forward(self, images: Tensor) -> Tensor:
        inputs = to_model_input(images, self.input_mean, self.input_std)
        return self.net(inputs.contiguous(memory_format=self.memory_format))

    def _shared_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        return loss, logits.argmax(dim=1), targets

    def on_train_start(self) -> None:
        # Lightning's sanity check runs validation first; it must not count towards the best.
        self.val_acc_best.reset()
        super().on_train_start()

    def on_train_epoch_start(self) -> None:
        self._epoch_metrics_logged = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, preds, targets = self._shared_step(batch)
        # update() rather than calling the metrics: their forward also computes a per-batch
        # value, which costs more than a small network's step and is not needed here
        self.train_loss.update(loss.detach())
        self.train_acc.update(preds, targets)
        # an explicit batch_size spares Lightning a walk through the batch on every log call
        size = len(targets)
        self.log("train/loss_step", loss.detach(), prog_bar=True, batch_size=size)
        if not getattr(self, "_epoch_metrics_logged", False):
            # the epoch metrics are metric objects that we update ourselves: Lightning only has
            # to know them once per epoch to compute, log and reset them at its end, and each
            # self.log costs about as much as the metric update (profiled, bench/README)
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, batch_size=size)
            self.log(
                "train/acc",
                self.train_acc,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                batch_size=size,
            )
            self._epoch_metrics_logged = True
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, preds, targets = self._shared_step(batch)
        self.val_loss.update(loss)
        self.val_acc.update(preds, targets)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, preds, targets = self._shared_step(batch)
        self.test_loss.update(loss)
        self.test_acc.update(preds, targets)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(images), dim=1)


def load_classifier(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    use: str = "classifying images",
) -> ClassifierModule:
    """A ClassifierModule rebuilt from its checkpoint alone; corrupt files, and checkpoints of
    another kind, end in a UserError."""
    return load_module(path, map_location, expected=ClassifierModule, use=use)
