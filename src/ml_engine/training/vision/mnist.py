"""MNIST datamodule with an in-memory fast path: uint8 tensors, whole batches drawn by index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ml_engine.training.batches import BatchIndexedDataset, ShardedBatchSampler, plain_container
from ml_engine.training.vision.augment import augment_batch, checked_augment
from ml_engine.training.vision.data_sources import DigitSplits, load_digits
from ml_engine.training.vision.image_data import mnist_spec

# what an ``augment`` node that leaves a key out gets for digits
MNIST_AUGMENT_DEFAULTS = {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1)}


class MNISTDataModule(L.LightningDataModule):
    """MNIST digits from ``source`` (auto | torchvision | bundled), kept in memory as uint8.

    Batches leave the loader as uint8 {N,1,28,28}; after the transfer to the device they become
    [0, 1] floats and, in training, get a random affine augmentation on the whole batch.
    """

    def __init__(
        self,
        source: str = "auto",
        data_dir: str = "data/",
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 12345,
        num_workers: int = 0,
        pin_memory: bool = False,
        download: bool = True,
        augment: dict[str, Any] | None = None,
        folds: int | None = None,
        test_fold: int = 0,
    ) -> None:
        super().__init__()
        self.augment = checked_augment(plain_container(augment) if augment else None)
        # plain containers only: checkpoints must load with torch's weights-only unpickler
        self.save_hyperparameters(
            {
                "source": source,
                "data_dir": str(data_dir),
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "split_seed": split_seed,
                "num_workers": num_workers,
                "pin_memory": pin_memory,
                "download": download,
                "augment": self.augment,
                "folds": folds,
                "test_fold": test_fold,
            },
            logger=False,
        )
        self.splits: DigitSplits | None = None

    @property
    def source_used(self) -> str | None:
        """The source that was actually loaded (``auto`` resolves to one of the other two)."""
        return self.splits.source if self.splits else None

    def state_dict(self) -> dict[str, Any]:
        # saved in every checkpoint: eval must know whether the test split came from the
        # bundled digits (where split settings decide what is held out)
        return {"source_used": self.source_used}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the source is resolved again on this machine by ``setup``."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_digits(
                source=self.hparams.source,
                data_dir=Path(self.hparams.data_dir),
                val_fraction=self.hparams.val_fraction,
                test_fraction=self.hparams.test_fraction,
                seed=self.hparams.split_seed,
                download=self.hparams.download,
                folds=self.hparams.get("folds"),
                test_fold=self.hparams.get("test_fold", 0),
            )

    def _loader(self, split: tuple[Tensor, Tensor], train: bool) -> DataLoader:
        images, labels = split
        rank, world_size, seed = 0, 1, self.hparams.split_seed
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
            seed = torch.initial_seed() % 2**31 if train else seed
        sampler = ShardedBatchSampler(
            size=len(labels),
            batch_size=self.hparams.batch_size if train else self.hparams.eval_batch_size,
            shuffle=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            pad=train,
        )
        return DataLoader(
            BatchIndexedDataset(images.unsqueeze(1), labels),
            sampler=sampler,
            batch_size=None,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits.train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.test, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        images = images.float().div_(255)
        if self.augment and self.trainer is not None and self.trainer.training:
            images = augment_batch(images, self.augment, MNIST_AUGMENT_DEFAULTS)
        return images, labels

    def data_spec(self) -> dict[str, Any]:
        """28×28 grayscale digits "0".."9" with MNIST's statistics, for the model's checkpoint."""
        return mnist_spec()
