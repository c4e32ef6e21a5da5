"""Generic in-memory batching shared by every datamodule: whole batches gathered by index,
sharded across ranks; configs turned into plain containers for checkpoints."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import Dataset, Sampler


def plain_container(node: Any) -> Any:
    """DictConfig → plain containers, so checkpoints hold no OmegaConf objects."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


class BatchIndexedDataset(Dataset):
    """Indexing with a list of indices returns the whole batch: one tensor gather per batch."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        return self.images[indices], self.labels[indices]


class ShardedBatchSampler(Sampler[Tensor]):
    """Yields index batches, shuffled per epoch and sharded across distributed ranks.

    Training shards are padded by wrapping around so every rank steps the same number of times
    (gradient all-reduce needs that); evaluation shards are not padded, so no digit counts twice.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.pad, self.drop_last = rank, world_size, pad, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_indices(self) -> Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        if self.pad and self.world_size > 1:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order = torch.cat([order, order[: total - self.size]])
        return order[self.rank :: self.world_size]

    def _shard_size(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        indices = self._shard_indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield indices[start : start + self.batch_size]
