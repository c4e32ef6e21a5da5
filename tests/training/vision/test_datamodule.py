"""The MNIST datamodule: bundled split, fast batches, sharding, augmentation, source fallback."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_engine.errors import UserError
from ml_engine.training.batches import ShardedBatchSampler
from ml_engine.training.vision.augment import random_affine
from ml_engine.training.vision.data_sources import (
    load_digits,
    stratified_fold_split,
    stratified_split,
)
from ml_engine.training.vision.mnist import MNISTDataModule


def test_bundled_split_is_stratified_deterministic_and_disjoint() -> None:
    first = load_digits("bundled", Path("unused"), 0.05, 0.05, seed=3)
    again = load_digits("bundled", Path("unused"), 0.05, 0.05, seed=3)
    other = load_digits("bundled", Path("unused"), 0.05, 0.05, seed=4)
    assert first.source == "bundled"
    assert [len(split[1]) for split in (first.train, first.val, first.test)] == [4500, 250, 250]
    for _, labels in (first.val, first.test):
        assert torch.bincount(labels, minlength=10).tolist() == [25] * 10
    assert torch.equal(first.test[0], again.test[0])
    assert not torch.equal(first.test[0], other.test[0])
    train_rows = {bytes(img.numpy()) for img in first.train[0]}
    assert not any(bytes(img.numpy()) in train_rows for img in first.test[0])
    assert first.train[0].dtype == torch.uint8 and first.train[0].shape[1:] == (28, 28)


def test_stratified_split_covers_every_index_once() -> None:
    labels = np.repeat(np.arange(10), 37)
    parts = stratified_split(labels, (0.0, 0.1, 0.2), seed=0)
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(len(labels)))


def test_fold_splits_test_every_index_once_and_stay_disjoint() -> None:
    labels = np.repeat(np.arange(10), 50)
    tests = []
    for fold in range(5):
        train, val, test = stratified_fold_split(labels, 0.05, 5, fold, seed=7)
        assert len(test) == 100 and len(val) == 20 and len(train) == 380  # round(2.5) == 2
        assert np.bincount(labels[test]).tolist() == [10] * 10
        joined = np.sort(np.concatenate([train, val, test]))
        assert np.array_equal(joined, np.arange(len(labels)))  # disjoint, complete
        tests.append(test)
    assert np.array_equal(np.sort(np.concatenate(tests)), np.arange(len(labels)))
    with pytest.raises(UserError, match="test_fold=5"):
        stratified_fold_split(labels, 0.05, 5, 5, seed=7)


def test_bundled_fold_is_the_test_split() -> None:
    splits = load_digits("bundled", Path("unused"), 0.05, 0.05, seed=3, folds=5, test_fold=2)
    assert [len(split[1]) for split in (splits.train, splits.val, splits.test)] == [3750, 250, 1000]


def test_batches_are_uint8_until_transfer_then_floats_in_unit_range() -> None:
    datamodule = MNISTDataModule(source="bundled", batch_size=32, augment=None)
    datamodule.setup()
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (32, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (32,)
    floats, _ = datamodule.on_after_batch_transfer((images, labels), 0)
    assert floats.dtype == torch.float32 and floats.min() >= 0.0 and floats.max() <= 1.0
    assert len(datamodule.train_dataloader()) == 4500 // 32 + 1


def test_training_order_changes_per_epoch_and_eval_order_is_fixed() -> None:
    sampler = ShardedBatchSampler(size=100, batch_size=10, shuffle=True, seed=1)
    epoch0 = torch.cat(list(sampler))
    sampler.set_epoch(1)
    epoch1 = torch.cat(list(sampler))
    assert sorted(epoch0.tolist()) == list(range(100)) and not torch.equal(epoch0, epoch1)
    fixed = ShardedBatchSampler(size=25, batch_size=10, shuffle=False, seed=1)
    assert torch.cat(list(fixed)).tolist() == list(range(25)) and len(fixed) == 3


@pytest.mark.parametrize("size", [100, 101, 7])
def test_shards_of_ranks(size: int) -> None:
    def shard(rank: int, pad: bool) -> list[int]:
        sampler = ShardedBatchSampler(size, 8, True, 5, rank=rank, world_size=2, pad=pad)
        return torch.cat(list(sampler)).tolist()

    train0, train1 = shard(0, pad=True), shard(1, pad=True)
    assert len(train0) == len(train1)  # same number of steps on each rank
    assert set(train0) | set(train1) == set(range(size))
    eval0, eval1 = shard(0, pad=False), shard(1, pad=False)
    assert sorted(eval0 + eval1) == list(range(size))  # every digit exactly once


def test_random_affine_moves_pixels_but_keeps_shape_and_range() -> None:
    torch.manual_seed(0)
    images = torch.zeros(16, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 1.0
    moved = random_affine(images, max_degrees=15, max_shift=0.1, scale=(0.9, 1.1))
    assert moved.shape == images.shape
    assert moved.min() >= 0.0 and moved.max() <= 1.0
    assert (moved - images).abs().sum() > 1.0


def test_elastic_distortion_bends_strokes_smoothly_and_is_off_at_zero() -> None:
    from ml_engine.training.vision.augment import augment_batch, elastic_displacement

    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 4:24, 13:15] = 1.0  # a vertical stroke
    torch.manual_seed(0)
    field = elastic_displacement(images, alpha=34.0, sigma=4.0) * 14  # in pixels
    assert field.shape == (8, 28, 28, 2)
    # a smooth field: neighbours move nearly alike, the whole moves by about a pixel
    assert 0.3 < field.std() < 3.0
    assert (field[:, 1:] - field[:, :-1]).abs().mean() < 0.2 * field.abs().mean()
    torch.manual_seed(0)
    bent = augment_batch(images, {"elastic_alpha": 34.0})
    assert bent.shape == images.shape and bent.min() >= 0 and bent.max() <= 1
    assert (bent - images).abs().sum() > 1.0
    torch.manual_seed(0)
    still = augment_batch(images, {"elastic_alpha": 0.0})  # nothing else asked for either
    assert torch.allclose(still, images, atol=1e-6)


def test_auto_falls_back_to_bundled_with_one_warning_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        splits = load_digits("auto", tmp_path, 0.05, 0.05, seed=1, download=False)
    assert splits.source == "bundled"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "bundled" in warnings[0]


def test_torchvision_source_without_files_or_download_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="full MNIST not found"):
        load_digits("torchvision", tmp_path, 0.05, 0.05, seed=1, download=False)


def test_torchvision_layout_is_read_with_official_test_set(tmp_path: Path, bundled_digits) -> None:
    """Write a small set in torchvision's MNIST layout and check train/val/test come from it."""
    images, labels = bundled_digits
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def write_idx(name: str, array: np.ndarray, magic: int) -> None:
        header = np.array([magic, *array.shape], dtype=">i4").tobytes()
        (raw / name).write_bytes(header + array.astype(np.uint8).tobytes())

    write_idx("train-images-idx3-ubyte", images[:600], 2051)
    write_idx("train-labels-idx1-ubyte", labels[:600], 2049)
    write_idx("t10k-images-idx3-ubyte", images[4000:4100], 2051)
    write_idx("t10k-labels-idx1-ubyte", labels[4000:4100], 2049)
    splits = load_digits("auto", tmp_path, 0.1, 0.0, seed=1, download=False)
    assert splits.source == "torchvision"
    assert len(splits.test[1]) == 100 and len(splits.train[1]) + len(splits.val[1]) == 600
    assert torch.equal(splits.test[0], torch.from_numpy(images[4000:4100]))


def test_unknown_source_names_the_accepted_ones(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="accepted: auto, torchvision, bundled"):
        load_digits("kaggle", tmp_path, 0.05, 0.05, seed=1)


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"elastic_alfa": 3}, "unknown datamodule.augment key 'elastic_alfa'; accepted: hflip,"),
        ({"elastic_alpha": "abc"}, "datamodule.augment.elastic_alpha='abc' is not valid; exp"),
        ({"scale": [1.1, 0.9]}, "datamodule.augment.scale=[1.1, 0.9] is not valid; expected ["),
        ({"elastic_sigma": 0}, "datamodule.augment.elastic_sigma=0 is not valid; expected a n"),
    ],
)
def test_a_bad_augment_node_is_one_line_before_training(augment: dict, message: str) -> None:
    from ml_engine.errors import UserError

    with pytest.raises(UserError, match="^" + re.escape(message)):
        MNISTDataModule(source="bundled", augment=augment)
