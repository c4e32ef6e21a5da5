"""Datamodules for any image classification data: a folder of class folders, or a torchvision
dataset by name.

Both hand batches of uint8 {N,C,H,W} to the device, where they become [0, 1] floats (and get the
batch augmentation in training), like the MNIST datamodule; normalization is the model's, with
the statistics of the training split this datamodule computed (``data_spec``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ml_engine.errors import UserError
from ml_engine.training.batches import BatchIndexedDataset, ShardedBatchSampler, plain_container
from ml_engine.training.vision.augment import augment_batch, checked_augment
from ml_engine.training.vision.data_sources import stratified_split
from ml_engine.training.vision.image_data import (
    channel_statistics,
    convert_image,
    data_spec,
    peek_image,
    read_image,
    size_pair,
)
from ml_engine.training.vision.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "val", "test")
# images decoded to measure the statistics of a streamed training split
STATISTICS_SAMPLE = 2000


@dataclass
class ImageSplit:
    """One split: uint8 images {N,C,H,W} in memory, or the files to decode per batch."""

    labels: Tensor
    images: Tensor | None = None
    paths: list[Path] | None = None


class DecodingDataset(Dataset):
    """Streamed images: each item decoded from its file when drawn (in DataLoader workers)."""

    def __init__(self, paths: list[Path], labels: Tensor, channels: int, size: tuple[int, int]):
        self.paths, self.labels, self.channels, self.size = paths, labels, channels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = int(index)
        image = read_image(self.paths[index], self.channels, self.size)
        return torch.from_numpy(image), self.labels[index]


class ImageClassDataModule(L.LightningDataModule):
    """What the image datamodules share: splits, loaders, batch augmentation and the data spec.

    Subclasses implement ``_load`` (splits, class names, channels, size) and ``source_used``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: dict[str, Any] | None = None,
        split_seed: int = 12345,
    ) -> None:
        super().__init__()
        self.augment = checked_augment(plain_container(augment) if augment else None)
        self.splits: dict[str, ImageSplit] | None = None
        self.class_names: list[str] = []
        self.channels = 0
        self.size: tuple[int, int] = (0, 0)
        self.mean, self.std = plain_container(mean), plain_container(std)

    @property
    def source_used(self) -> str:
        raise NotImplementedError

    def _load(self) -> dict[str, ImageSplit]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        # saved in every checkpoint, under the class name: eval finds the datamodule by it
        return {"source_used": self.source_used, "class_names": self.class_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the data is read again on this machine by ``setup``."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self._load()
            self._statistics()

    def _statistics(self) -> None:
        """Mean and std per channel of the training split, unless the config gives them."""
        if self.mean is not None and self.std is not None:
            self.mean, self.std = self._per_channel(self.mean), self._per_channel(self.std)
            return
        train = self.splits["train"]
        if train.images is not None:
            self.mean, self.std = channel_statistics(train.images.numpy())
            return
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        picked = torch.randperm(len(train.paths), generator=generator)[:STATISTICS_SAMPLE]
        sample = np.stack([read_image(train.paths[i], self.channels, self.size) for i in picked])
        self.mean, self.std = channel_statistics(sample)
        log.info("normalization from %d sampled training images", len(sample))

    def _per_channel(self, values: list[float] | float) -> list[float]:
        values = [values] if isinstance(values, (int, float)) else list(values)
        if len(values) == 1:
            return values * self.channels
        if len(values) != self.channels:
            raise UserError(
                f"datamodule.mean/std have {len(values)} values; the images have "
                f"{self.channels} channel(s) (give one value, or one per channel)"
            )
        return [float(v) for v in values]

    def data_spec(self) -> dict[str, Any]:
        """Input shape, normalization and class names, for the model and its checkpoint."""
        self.setup()
        return data_spec(self.channels, self.size, self.mean, self.std, self.class_names)

    def _loader(self, split: ImageSplit, train: bool) -> DataLoader:
        rank, world_size, seed = 0, 1, self.hparams.split_seed
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
            seed = torch.initial_seed() % 2**31 if train else seed
        sampler = ShardedBatchSampler(
            size=len(split.labels),
            batch_size=self.hparams.batch_size if train else self.hparams.eval_batch_size,
            shuffle=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            pad=train,
        )
        workers = self.hparams.num_workers
        common = {
            "num_workers": workers,
            "pin_memory": self.hparams.pin_memory,
            "persistent_workers": workers > 0,
        }
        if split.images is not None:  # one gather per batch, as for MNIST
            dataset = BatchIndexedDataset(split.images, split.labels)
            return DataLoader(dataset, sampler=sampler, batch_size=None, **common)
        dataset = DecodingDataset(split.paths, split.labels, self.channels, self.size)
        return DataLoader(dataset, batch_sampler=sampler, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"], train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        images = images.float().div_(255)
        if self.augment and self.trainer is not None and self.trainer.training:
            images = augment_batch(images, self.augment)
        return images, labels


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def scan_class_folders(
    root: Path, class_names: list[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, labels and class names (sorted folder names) of a folder of class folders
    (torchvision's ImageFolder layout).

    ``class_names``: those of the training folder, which a val/test folder must not extend.
    """
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(
            f"no class folders in {root} (expected one sub-folder of images per class, "
            "e.g. {root}/cat/1.jpg, {root}/dog/2.jpg)".replace("{root}", str(root))
        )
    names = class_names or [f.name for f in folders]
    paths, labels = [], []
    for folder in folders:
        if folder.name not in names:
            raise UserError(f"{folder} is a class that the training folder does not have")
        images = _images_in(folder)
        if not images:
            raise UserError(
                f"class folder {folder} holds no images (accepted: {', '.join(IMAGE_SUFFIXES)})"
            )
        paths += images
        labels += [names.index(folder.name)] * len(images)
    return paths, labels, names


class ImageFolderDataModule(ImageClassDataModule):
    """A folder of class folders: ``root/<class>/<image>``, or ``root/{train,val[,test]}/<class>/``.

    Without split folders, each class is split train/val/test by ``split_seed``. Images are
    decoded once into memory at ``image_size`` with ``channels`` when they fit in
    ``max_memory_mb``, else decoded per batch (``num_workers`` processes).
    """

    def __init__(
        self,
        root: str,
        image_size: int | list[int] | None = 64,
        channels: int | None = None,
        max_memory_mb: float = 2048,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 12345,
        batch_size: int = 64,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            batch_size, eval_batch_size, num_workers, pin_memory, mean, std, augment, split_seed
        )
        self.save_hyperparameters(
            {
                "root": str(root),
                "image_size": plain_container(image_size),
                "channels": channels,
                "max_memory_mb": max_memory_mb,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "split_seed": split_seed,
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "num_workers": num_workers,
                "pin_memory": pin_memory,
                "mean": self.mean,
                "std": self.std,
                "augment": self.augment,
            },
            logger=False,
        )

    @property
    def source_used(self) -> str:
        return "image_folder"

    def _root(self) -> Path:
        root = Path(self.hparams.root).expanduser()
        if not root.is_dir():
            raise UserError(
                f"datamodule.root={self.hparams.root}: no such folder (expected a folder of "
                "class folders of images)"
            )
        return root

    def _scan(self, root: Path) -> dict[str, tuple[list[Path], list[int]]]:
        """Paths and labels per split: the split folders if there are, else a seeded split."""
        if (root / "train").is_dir() and (root / "val").is_dir():
            *train, self.class_names = scan_class_folders(root / "train")
            scanned = {"train": tuple(train)}
            for split in ("val", "test"):
                if (root / split).is_dir():
                    *found, _ = scan_class_folders(root / split, self.class_names)
                    scanned[split] = tuple(found)
            if "test" not in scanned:
                log.warning("%s has no test/ folder: testing on val/", root)
                scanned["test"] = scanned["val"]
            return scanned
        paths, labels, self.class_names = scan_class_folders(root)
        fractions = (0.0, self.hparams.val_fraction, self.hparams.test_fraction)
        parts = stratified_split(np.asarray(labels), fractions, self.hparams.split_seed)
        return {
            split: ([paths[i] for i in part], [labels[i] for i in part])
            for split, part in zip(SPLIT_FOLDERS, parts, strict=True)
        }

    def _shape(self, paths: list[Path]) -> None:
        """Channels (1 when every image is grayscale) and size (the first image's) unless set."""
        channels, size = self.hparams.channels, size_pair(self.hparams.image_size)
        if channels is None:
            channels = max(peek_image(path)[0] for path in paths)
        if size is None:
            size = peek_image(paths[0])[1]
        if channels not in (1, 3):
            raise UserError(f"datamodule.channels={channels} is not valid; accepted: 1, 3, null")
        self.channels, self.size = channels, size

    def _load(self) -> dict[str, ImageSplit]:
        scanned = self._scan(self._root())
        self._shape([p for paths, _ in scanned.values() for p in paths])
        count = len({p for paths, _ in scanned.values() for p in paths})
        needed_mb = count * self.channels * math.prod(self.size) / 2**20
        in_memory = needed_mb <= self.hparams.max_memory_mb
        log.info(
            "%d images, %d classes, %s at %dx%d: %s (%.0f MB)",
            count,
            len(self.class_names),
            "RGB" if self.channels == 3 else "grayscale",
            *self.size,
            "decoded into memory" if in_memory else "streamed, decoded per batch",
            needed_mb,
        )
        return {
            split: self._split(paths, labels, in_memory)
            for split, (paths, labels) in scanned.items()
        }

    def _split(self, paths: list[Path], labels: list[int], in_memory: bool) -> ImageSplit:
        targets = torch.tensor(labels, dtype=torch.int64)
        if not in_memory:
            return ImageSplit(labels=targets, paths=paths)
        images = np.empty((len(paths), self.channels, *self.size), dtype=np.uint8)
        for i, path in enumerate(paths):
            images[i] = read_image(path, self.channels, self.size)
        return ImageSplit(labels=targets, images=torch.from_numpy(images))


def torchvision_dataset_class(name: str) -> type:
    """``torchvision.datasets.<name>``; an unknown name lists some accepted ones."""
    import torchvision.datasets as datasets
    from torchvision.datasets import VisionDataset

    found = getattr(datasets, name, None)
    if not (isinstance(found, type) and issubclass(found, VisionDataset)):
        accepted = ", ".join(TORCHVISION_EXAMPLES)
        raise UserError(
            f"datamodule.name={name} is not a torchvision dataset; accepted e.g.: {accepted} "
            "(any class of torchvision.datasets with a train/test split)"
        )
    return found


# datasets known to work here, named in the error for an unknown one
TORCHVISION_EXAMPLES = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "CIFAR10", "CIFAR100", "SVHN")


def expected_folder(cls: type, data_dir: Path) -> Path:
    """Where torchvision looks for the dataset's files under ``data_dir``: its ``base_folder``
    (CIFAR, SVHN, ...) or, for the MNIST family, ``<data_dir>/<name>/raw``."""
    base = getattr(cls, "base_folder", None)
    if isinstance(base, str):
        return data_dir / base
    if hasattr(cls, "raw_folder"):
        return data_dir / cls.__name__ / "raw"
    return data_dir


def _split_argument(cls: type, train: bool) -> dict[str, Any]:
    """``train=`` or ``split=``, whichever the dataset's constructor takes."""
    import inspect

    parameters = inspect.signature(cls.__init__).parameters
    if "train" in parameters:
        return {"train": train}
    if "split" in parameters:
        return {"split": "train" if train else "test"}
    raise UserError(
        f"torchvision's {cls.__name__} has no train/test split; put its images in class "
        "folders and use datamodule=image_folder"
    )


def _open_torchvision(cls: type, root: Path, train: bool, download: bool = False) -> Any:
    return cls(str(root), download=download, **_split_argument(cls, train))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def _move_into(source: Path, target: Path) -> None:
    """Every file under ``source`` moved to the same place under ``target`` (renames, no
    copies), replacing what is there: a download completes a folder the user started."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)


def _download_torchvision(cls: type, data_dir: Path, timeout_s: float = 20.0) -> None:
    """Both splits downloaded into a temporary folder inside ``data_dir`` and moved in whole,
    so a failed or interrupted download leaves nothing behind (torchvision writes its archives
    in place, and a dropped connection would leave half of one)."""
    created = [folder for folder in (data_dir, *data_dir.parents) if not folder.exists()]
    data_dir.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # an offline machine should fail fast, not hang
    try:
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".{cls.__name__}-download-") as tmp:
            for train in (True, False):
                _open_torchvision(cls, Path(tmp), train, download=True)
            _move_into(Path(tmp), data_dir)
    except BaseException:
        for folder in created:  # innermost first; only the folders this call made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        socket.setdefaulttimeout(previous_timeout)


def open_torchvision_splits(cls: type, data_dir: Path, download: bool) -> tuple[Any, Any]:
    """The dataset's train and test sets from ``data_dir``, downloaded first when they are not
    there and ``download`` allows; a one-line error that says where the files go otherwise."""
    where = expected_folder(cls, data_dir)
    try:
        return _open_torchvision(cls, data_dir, True), _open_torchvision(cls, data_dir, False)
    except UserError:
        raise
    except Exception as missing:  # torchvision's "not found" or a corrupt file
        if not download:
            raise UserError(
                f"did not find torchvision's {cls.__name__} in {data_dir} ({_one_line(missing)}); "
                f"put its files in {where} (torchvision's layout), or allow "
                "datamodule.download=true with network"
            ) from missing
    try:
        _download_torchvision(cls, data_dir)
        return _open_torchvision(cls, data_dir, True), _open_torchvision(cls, data_dir, False)
    except UserError:
        raise
    except Exception as exc:  # a network or an archive failure
        raise UserError(
            f"could not download torchvision's {cls.__name__} in {data_dir} ({_one_line(exc)}); "
            f"put its files in {where} (torchvision's layout), or allow "
            "datamodule.download=true with network"
        ) from exc


def _images_as_uint8(dataset: Any) -> Tensor:
    """The dataset's images as uint8 {N,C,H,W}: its ``data`` array where it holds one (MNIST
    family: {N,H,W}; CIFAR: {N,H,W,C}; SVHN: {N,C,H,W}), else every item as a PIL image."""
    data = getattr(dataset, "data", None)
    if isinstance(data, (np.ndarray, Tensor)) and data.dtype in (np.uint8, torch.uint8):
        images = torch.as_tensor(data)
        if images.dim() == 3:
            return images.unsqueeze(1)
        if images.dim() == 4 and images.shape[-1] in (1, 3):
            return images.permute(0, 3, 1, 2).contiguous()
        if images.dim() == 4 and images.shape[1] in (1, 3):
            return images
    first = dataset[0][0]
    channels, size = (1 if first.mode in ("1", "L") else 3), (first.height, first.width)
    return torch.from_numpy(
        np.stack([convert_image(dataset[i][0], channels, size) for i in range(len(dataset))])
    )


def _labels(dataset: Any) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = getattr(dataset, "labels", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(np.asarray(targets), dtype=torch.int64)


def resize_uint8(images: Tensor, channels: int, size: tuple[int, int]) -> Tensor:
    """uint8 {N,C,H,W} → ``channels`` (gray ↔ RGB) at ``size``, in chunks."""
    if images.shape[1] == channels and tuple(images.shape[2:]) == size:
        return images
    chunks = []
    for block in images.split(4096):
        block = block.float()
        if block.shape[1] == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            block = (block * weights).sum(1, keepdim=True)
        elif block.shape[1] == 1 and channels == 3:
            block = block.expand(-1, 3, -1, -1)
        if tuple(block.shape[2:]) != size:
            block = torch.nn.functional.interpolate(
                block, size=size, mode="bilinear", antialias=True, align_corners=False
            )
        chunks.append(block.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks)


class TorchvisionDataModule(ImageClassDataModule):
    """Any torchvision classification dataset by ``name``, read from (or downloaded into)
    ``data_dir``: its training set split train/val by ``split_seed``, its own test set as test.

    Held in memory as uint8 (torchvision's classification sets are small enough); ``image_size``
    and ``channels`` default to the dataset's own.
    """

    def __init__(
        self,
        name: str,
        data_dir: str = "data/",
        download: bool = False,
        image_size: int | list[int] | None = None,
        channels: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 12345,
        batch_size: int = 64,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            batch_size, eval_batch_size, num_workers, pin_memory, mean, std, augment, split_seed
        )
        self.save_hyperparameters(
            {
                "name": name,
                "data_dir": str(data_dir),
                "download": download,
                "image_size": plain_container(image_size),
                "channels": channels,
                "val_fraction": val_fraction,
                "split_seed": split_seed,
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "num_workers": num_workers,
                "pin_memory": pin_memory,
                "mean": self.mean,
                "std": self.std,
                "augment": self.augment,
            },
            logger=False,
        )

    @property
    def source_used(self) -> str:
        return f"torchvision:{self.hparams.name}"

    def _load(self) -> dict[str, ImageSplit]:
        cls = torchvision_dataset_class(self.hparams.name)
        data_dir = Path(self.hparams.data_dir).expanduser()
        train_set, test_set = open_torchvision_splits(cls, data_dir, self.hparams.download)
        train_images, train_labels = _images_as_uint8(train_set), _labels(train_set)
        self.channels = self.hparams.channels or train_images.shape[1]
        self.size = size_pair(self.hparams.image_size) or tuple(train_images.shape[2:])
        self.class_names = [str(c) for c in getattr(train_set, "classes", [])] or [
            str(i) for i in range(int(train_labels.max()) + 1)
        ]
        fractions = (0.0, self.hparams.val_fraction, 0.0)
        train, val, _ = stratified_split(train_labels.numpy(), fractions, self.hparams.split_seed)
        images = resize_uint8(train_images, self.channels, self.size)
        test_images = resize_uint8(_images_as_uint8(test_set), self.channels, self.size)
        return {
            "train": ImageSplit(train_labels[train], images[train]),
            "val": ImageSplit(train_labels[val], images[val]),
            "test": ImageSplit(_labels(test_set), test_images),
        }
