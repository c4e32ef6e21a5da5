"""Evaluation: test metrics of a checkpoint, recorded in the eval run's ``job.json``.

Lightning loads once the checkpoint and the settings passed their checks.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from ml_engine.training.checkpoints import (
    adopt_data_settings,
    adopt_datamodule,
    check_datamodule_fits,
    checked_checkpoint,
    module_from_checkpoint,
)
from ml_engine.training.run_checks import check_run_settings

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test the checkpoint at ``cfg.ckpt_path`` on its own test split (the split settings saved
    in the checkpoint, unless given on the command line); a datamodule without a test split
    (text) reports its validation split, the held-out part it has."""
    started = time.perf_counter()
    ckpt_path, checkpoint = checked_checkpoint(cfg.ckpt_path)
    adopt_datamodule(cfg, checkpoint, ckpt_path)
    check_datamodule_fits(cfg, checkpoint, ckpt_path)
    adopt_data_settings(cfg, checkpoint, ckpt_path)
    check_run_settings(cfg)

    from ml_engine.training.instantiators import instantiate_loggers
    from ml_engine.training.lightning_run import (
        collect_metrics,
        finish_run,
        has_test_split,
        prepare_lightning_run,
    )

    prepare_lightning_run(cfg)
    model = module_from_checkpoint(ckpt_path, checkpoint)

    datamodule: L.LightningDataModule = instantiate(cfg.datamodule)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False)
    if has_test_split(datamodule):
        trainer.test(model=model, datamodule=datamodule)
    else:
        log.info(
            "%s has no test split: evaluating on its validation split", cfg.datamodule._target_
        )
        trainer.validate(model=model, datamodule=datamodule)

    metrics = collect_metrics(trainer, {})
    metrics.update(
        ckpt_path=str(cfg.ckpt_path),
        data_source=datamodule.source_used,
        wall_s=round(time.perf_counter() - started, 3),
    )
    finish_run(cfg, trainer, metrics)
    return metrics
