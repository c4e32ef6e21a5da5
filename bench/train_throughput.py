"""Images/s of the real training path against a minimal hand-written PyTorch loop.

Ours: the composed `train` config — MNISTDataModule, ClassifierModule(cnn_mnist) and a Lightning
Trainer with the default callbacks and TensorBoard logger — fitted for a fixed number of
steps. Baseline: the same network, optimizer, one-cycle schedule, label smoothing, batch
augmentation, digits, batch size and steps, written as a bare loop. Validation is off in both so
that only training is timed. Rounds alternate; the ratio of medians is printed.

    python bench/train_throughput.py [--model cnn_mnist] [--batch-size 64] [--steps 200]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ROOT, ratio_line
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from ml_engine.run.launch import register_resolvers
from ml_engine.training.datamodules import random_affine
from ml_engine.training.instantiators import instantiate_callbacks, instantiate_loggers
from ml_engine.training.module import to_model_input


def compose_train_config(model: str, batch_size: int, steps: int, output_dir: Path):
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [f"model={model}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.datamodule.source = "bundled"
        cfg.datamodule.batch_size = batch_size
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.max_steps = steps
        cfg.trainer.max_epochs = -1
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.callbacks.early_stopping = None  # monitors validation, which is off here
    HydraConfig().set_config(cfg)
    return cfg


def lightning_round(cfg) -> float:
    torch.manual_seed(0)
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")  # loading digits is not training: the baseline's is untimed too
    model = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.callbacks),
        logger=instantiate_loggers(cfg.logger),
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    elapsed = time.perf_counter() - started
    return trainer.global_step * cfg.datamodule.batch_size / elapsed


def baseline_round(cfg) -> float:
    """The loop a careful PyTorch user writes by hand for the same job."""
    torch.manual_seed(0)
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")
    images, labels = datamodule.splits.train
    images = images.unsqueeze(1)
    module = instantiate(cfg.model)  # only to build the same network and optimizer settings
    net = module.net
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
            loss = F.cross_entropy(net(to_model_input(x)), labels[index], label_smoothing=smoothing)
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
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train_config(args.model, args.batch_size, args.steps, Path(tmp))
        baseline_round(cfg)  # warm-up: first-call allocations and kernel selection
        for _ in range(args.rounds):
            base.append(baseline_round(cfg))
            ours.append(lightning_round(cfg))
    print(f"{args.model}, batch size {args.batch_size}, {args.steps} steps per round, CPU")
    print(ratio_line("training throughput", ours, base, "images/s"))


if __name__ == "__main__":
    main()
