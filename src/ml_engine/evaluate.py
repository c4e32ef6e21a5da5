"""Evaluation: test metrics of a checkpoint, written to the eval run's metrics.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from ml_engine.accelerators import check_accelerator
from ml_engine.checkpoints import load_classifier
from ml_engine.cli import write_json_atomic
from ml_engine.extras import apply_extras, collect_metrics
from ml_engine.instantiators import instantiate_loggers
from ml_engine.validation import TRAIN_RULES, check_config


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test the checkpoint at ``cfg.ckpt_path`` on the configured datamodule's test split."""
    check_config(cfg, TRAIN_RULES)
    check_accelerator(cfg.trainer.get("accelerator"))
    apply_extras(cfg)
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    model = load_classifier(cfg.ckpt_path)

    datamodule: L.LightningDataModule = instantiate(cfg.datamodule)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False)
    trainer.test(model=model, datamodule=datamodule)

    metrics = collect_metrics(trainer, {})
    metrics.update(
        ckpt_path=str(cfg.ckpt_path),
        data_source=datamodule.source_used,
        wall_s=round(time.perf_counter() - started, 3),
    )
    if trainer.is_global_zero:
        write_json_atomic(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        print(f"run_dir: {cfg.paths.output_dir}", flush=True)
    return metrics
