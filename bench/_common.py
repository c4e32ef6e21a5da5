"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def compose_train_config(overrides: list[str], steps: int, output_dir: Path) -> Any:
    """The ``train`` config as ``python train.py <overrides>`` composes it, fitted for ``steps``
    on the CPU with validation off (only training is timed) and outputs under ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from ml_engine.run.launch import register_resolvers
    from ml_engine.training.precision import register_precision_resolver

    register_resolvers()
    register_precision_resolver()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.max_steps = steps
        cfg.trainer.max_epochs = -1
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.callbacks.early_stopping = None  # monitors validation, which is off here
    HydraConfig().set_config(cfg)
    return cfg


def lightning_steps_per_s(cfg: Any, seed: int = 0) -> float:
    """Optimizer steps per second of ``Trainer.fit`` on the composed config: the datamodule,
    model, callbacks, loggers and trainer it instantiates, as ``train`` does."""
    import torch
    from hydra.utils import instantiate

    from ml_engine.training.instantiators import instantiate_callbacks, instantiate_loggers

    torch.manual_seed(seed)
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")  # reading the data is not training: the baseline's is untimed too
    model = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.callbacks),
        logger=instantiate_loggers(cfg.logger),
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return trainer.global_step / (time.perf_counter() - started)


def quiet_lightning() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def ratio_line(label: str, ours: list[float], baseline: list[float], unit: str) -> str:
    """Median rates and the median of per-round ratios (ours ÷ baseline of the same round).

    Rounds alternate baseline and ours back to back, so a round's ratio sees the same machine
    load on both sides; the median of those ratios is the figure the README quotes.
    """
    ours_median, base_median = statistics.median(ours), statistics.median(baseline)
    ratios = [o / b for o, b in zip(ours, baseline, strict=True)]
    return (
        f"{label}: ours {ours_median:,.1f} {unit}, baseline {base_median:,.1f} {unit}, "
        f"ratio {statistics.median(ratios):.3f} "
        f"(per round: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
