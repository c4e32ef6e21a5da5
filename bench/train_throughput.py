"""Images/s of the real training path against a minimal hand-written PyTorch loop.

Ours: the composed `train` config — MNISTDataModule, ClassifierModule(cnn_mnist) and a Lightning
Trainer with the default callbacks and TensorBoard logger — fitted for a fixed number of
steps. Baseline: the same network, optimizer, one-cycle schedule, label smoothing, batch
augmentation, digits, batch size and steps, written as a bare loop. Validation is off in both so
that only training is timed. Both sides get a warm-up round; then rounds alternate which side goes
first (so neither always runs on a machine the other just heated or loaded), and the median of
the per-round ratios is printed with every round's ratio, which shows how noisy the figure is.

    python bench/train_throughput.py [--model cnn_mnist] [--batch-size 64] [--steps 200]
"""

from __future__ import annotations

import os

# sleeping OpenMP waits, as the entrypoints set them (src/ml_engine/run/launch.py), before torch
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    compose_train_config,
    lightning_steps_per_s,
    quiet_lightning,
    ratio_line,
)
from hydra.utils import instantiate
from omegaconf import open_dict

from ml_engine.training.vision.augment import random_affine
from ml_engine.training.vision.module import to_model_input


def compose_mnist_config(model: str, batch_size: int, steps: int, output_dir: Path):
    cfg = compose_train_config([f"model={model}"], steps, output_dir)
    with open_dict(cfg):
        cfg.datamodule.source = "bundled"
        cfg.datamodule.batch_size = batch_size
    return cfg


def lightning_round(cfg) -> float:
    return lightning_steps_per_s(cfg) * cfg.datamodule.batch_size


def baseline_round(cfg) -> float:
    """The loop a careful PyTorch user writes by hand for the same job."""
    torch.manual_seed(0)
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")
    images, labels = datamodule.splits.train
    images = images.unsqueeze(1)
    module = instantiate(cfg.model)  # only to build the same network and optimizer settings
    net = module.net  # in the module's memory format (model.channels_last), as is the input
    memory_format = module.memory_format
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    steps, batch_size = cfg.trainer.max_steps, cfg.datamodule.batch_size
    scheduler = instantiate(cfg.model.scheduler)(optimizer=optimizer, total_steps=steps)
    augment = cfg.datamodule.augment
    smoothing = cfg.model.label_smoothing

    net.train()
    started, done = time.perf_counter(), 0
    while done < steps:
        order = torch.randperm(len(labels))
        for start in range(0, len(order), batch_size):
            if done == steps:
                break
            index = order[start : start + batch_size]
            x = images[index].float().div_(255)
            x = random_affine(x, augment.degrees, augment.translate, tuple(augment.scale))
            x = to_model_input(x).contiguous(memory_format=memory_format)
            loss = F.cross_entropy(net(x), labels[index], label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    quiet_lightning()

    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_mnist_config(args.model, args.batch_size, args.steps, Path(tmp))
        # warm-up: first-call allocations, kernel selection, Lightning's imports and plugins
        baseline_round(cfg)
        lightning_round(cfg)
        for index in range(args.rounds):
            if index % 2:
                ours.append(lightning_round(cfg))
                base.append(baseline_round(cfg))
            else:
                base.append(baseline_round(cfg))
                ours.append(lightning_round(cfg))
    print(f"{args.model}, batch size {args.batch_size}, {args.steps} steps per round, CPU")
    print(ratio_line("training throughput", ours, base, "images/s"))


if __name__ == "__main__":
    main()
