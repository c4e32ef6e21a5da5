"""Training: checks → seed → data, model, callbacks, loggers, trainer → fit → test → metrics.

Lightning loads once the settings passed their checks: a refused run ends without it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from ml_engine.errors import UserError
from ml_engine.training.checkpoints import (
    adopt_data_settings,
    check_checkpoint_file,
    checked_checkpoint,
    config_choice,
    configured_module,
)
from ml_engine.training.run_checks import check_run_settings

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test the configured model; returns the metrics (the job wrapper writes them
    into the run's ``job.json``)."""
    started = time.perf_counter()
    resume_from = _checkpoint_to_resume(cfg)
    check_run_settings(cfg)

    from ml_engine.training.instantiators import instantiate_callbacks, instantiate_loggers
    from ml_engine.training.lightning_run import (
        collect_metrics,
        finish_run,
        has_test_split,
        log_hyperparameters,
        prepare_lightning_run,
    )
    from ml_engine.training.pruning import pruned_at_epoch, pruning_callbacks

    prepare_lightning_run(cfg)
    datamodule: L.LightningDataModule = instantiate(cfg.datamodule)
    if cfg.get("test") and not has_test_split(datamodule):
        raise UserError(
            f"test=true needs a test split, and {type(datamodule).__name__} has none (its "
            "held-out text is the validation split, reported as val/loss); set test=false"
        )
    model: L.LightningModule = instantiate(cfg.model, **data_arguments(datamodule, cfg.model))
    callbacks = instantiate_callbacks(cfg.get("callbacks")) + pruning_callbacks(cfg)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(model=model, datamodule=datamodule, ckpt_path=resume_from)
    fit_metrics = dict(trainer.callback_metrics)

    best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    pruned = pruned_at_epoch(callbacks)
    if cfg.get("test") and pruned is None:  # a pruned trial's test would cost, not inform
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best_ckpt or None)

    metrics = collect_metrics(trainer, fit_metrics)
    metrics.update(
        best_ckpt=best_ckpt or None,
        last_ckpt=_last_checkpoint(trainer),
        data_source=datamodule.source_used,
        epochs_run=trainer.current_epoch,
        wall_s=round(time.perf_counter() - started, 3),
    )
    if pruned is not None:
        metrics["pruned_at_epoch"] = pruned
    log_hyperparameters(cfg, model, trainer, metrics)
    finish_run(cfg, trainer, metrics)
    return metrics


def data_arguments(datamodule: L.LightningDataModule, model_cfg: DictConfig) -> dict[str, Any]:
    """What the model takes from an image datamodule: input shape, normalization and class
    names (its ``data_spec``), so that they come from the data and end in the checkpoint. A
    model that takes no ``data`` (a language model) gets none: it names the datamodule it
    needs itself, in one line, once the trainer is set up."""
    import inspect

    from hydra.utils import get_class

    spec = getattr(datamodule, "data_spec", None)
    if spec is None:
        return {}
    takes = inspect.signature(get_class(model_cfg._target_)).parameters
    return {"data": spec()} if "data" in takes else {}


def _checkpoint_to_resume(cfg: DictConfig) -> Path | None:
    """``cfg.ckpt_path`` checked before anything is printed or built; ``last`` is the newest
    ``last.ckpt`` of this task's runs that the configured model wrote (classifier and language
    model runs share the folder). The run resumes on the checkpoint's data split."""
    if not cfg.get("ckpt_path"):
        return None
    runs_dir = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    check_checkpoint_file(cfg.ckpt_path, runs_dir)  # before torch and the wings load
    path, checkpoint = checked_checkpoint(
        cfg.ckpt_path,
        runs_dir=runs_dir,
        expected=configured_module(cfg.get("model")),
        use=f"resuming {config_choice('model', cfg.get('model'))}",
    )
    adopt_data_settings(cfg, checkpoint, path)
    log.info("resuming from %s", path)
    return path


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") if callback else ""
    return path or None
