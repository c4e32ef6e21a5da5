"""The first and last steps every Lightning task shares: chores, seed, metrics, HParams (the
checks of its settings come before Lightning loads: training/run_checks.py)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from ml_engine.run.extras import apply_extras
from ml_engine.run.helpers import finite_or_none, is_real_number

log = logging.getLogger(__name__)


def prepare_lightning_run(cfg: DictConfig) -> None:
    """What every Lightning task does first, once its settings passed
    (run_checks.check_run_settings): chores, seed."""
    route_lightning_logs_through_hydra()
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)


def has_test_split(datamodule: L.LightningDataModule) -> bool:
    """Whether the datamodule holds out a test split (datamodule=text has train and val only)."""
    return is_overridden("test_dataloader", datamodule, L.LightningDataModule)


def close_loggers() -> None:
    """End what Lightning leaves open: a W&B run lasts until the process exits otherwise, so its
    files would be written after ``run_dir:`` and a sweep's next in-process job would reuse it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def finish_run(cfg: DictConfig, trainer: L.Trainer, metrics: Mapping[str, Any]) -> None:
    """Close the loggers; rank zero prints ``run_dir:`` last. The metrics the task returns are
    written once, into the run's ``job.json``, by the job wrapper (run/launch.run_job)."""
    close_loggers()
    if trainer.is_global_zero:
        print(f"run_dir: {cfg.paths.output_dir}", flush=True)


def route_lightning_logs_through_hydra() -> None:
    """Lightning adds its own stderr handler; under Hydra's logging every line would print twice."""
    if not logging.getLogger().handlers:  # no Hydra logging configured: keep Lightning's own
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    return value


def collect_metrics(trainer: L.Trainer, fit_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Final fit metrics overlaid with test metrics, as plain floats; a NaN or infinite one
    (a diverged loss) is kept as None, so the key still says it was measured."""
    merged = {**fit_metrics, **trainer.callback_metrics}
    return {
        key: finite_or_none(number)
        for key, value in sorted(merged.items())
        if is_real_number(number := _scalar(value))
    }


def _flat_hparams(cfg: DictConfig, model: L.LightningModule) -> dict[str, Any]:
    hparams: dict[str, Any] = {}
    for key in ("model", "datamodule", "trainer", "seed", "tags", "ckpt_path"):
        node = cfg.get(key)
        hparams[key] = (
            OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        )
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    return hparams


FINAL_METRIC_PREFIX = "hp/"


def final_metric_tags(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The run's final metrics under tags of their own (``val/acc`` → ``hp/val/acc``).

    Written again under its curve's tag, a final value at an earlier step than the curve's last
    makes TensorBoard's server drop the curve's earlier points (steps must not go back).
    """
    return {
        f"{FINAL_METRIC_PREFIX}{key}": value
        for key, value in metrics.items()
        if isinstance(value, float) and "/" in key
    }


def log_hyperparameters(
    cfg: DictConfig, model: L.LightningModule, trainer: L.Trainer, metrics: Mapping[str, Any]
) -> None:
    """Hyperparameters with the run's real final metrics (``hp/...``), for TensorBoard's HParams
    tab and the other loggers' run pages."""
    hparams = _flat_hparams(cfg, model)
    hparams["data_source"] = metrics.get("data_source")
    final = final_metric_tags(metrics)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics=final)
        else:
            logger.log_hyperparams(hparams)
            logger.log_metrics(final, step=trainer.global_step)
        logger.save()
