"""Pruning for Optuna sweeps: each epoch's value of the optimized metric goes to the job's
trial, and a trial the study's pruner gives up on stops after that epoch.

The job stops the way early stopping does (``trainer.should_stop``), so its checkpoints and
logs are whole; ``train`` then skips the test and reports ``pruned_at_epoch``, which makes the
job's record ``pruned`` and the sweeper tell the study so.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from ml_engine.errors import UserError
from ml_engine.run.optuna_trial import current_trial, pruning_requested

log = logging.getLogger(__name__)


class TrialPruning(Callback):
    """Reports ``monitor`` after every validation epoch (steps 1, 2, …); stops the run when the
    pruner says so."""

    def __init__(self, trial: Any, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.pruned_at_epoch: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned_at_epoch is not None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise UserError(
                f"pruning reports optimized_metric={self.monitor!r} each epoch, and validation "
                f"logged no such metric; logged: {', '.join(sorted(trainer.callback_metrics))}"
            )
        epoch = trainer.current_epoch + 1  # counted as the progress line counts: 1, 2, …
        number = float(value)
        # Optuna treats NaN as the worst value; a diverged run is pruned like any bad one
        self.trial.report(number if math.isfinite(number) else math.nan, step=epoch)
        if self.trial.should_prune():
            self.pruned_at_epoch = epoch
            trainer.should_stop = True
            log.info("trial %d pruned after epoch %d (%s=%.4g)", self.trial.number, epoch,
                     self.monitor, number)  # fmt: skip


def pruning_callbacks(cfg: DictConfig) -> list[Callback]:
    """The pruning callback when this job is a trial of an Optuna sweep with a pruner."""
    if not pruning_requested():
        return []
    monitor = cfg.get("optimized_metric")
    if not isinstance(monitor, str):
        raise UserError(
            f"pruning needs one optimized_metric, got {monitor!r}; set hydra.sweeper.pruner=none"
        )
    return [TrialPruning(current_trial(), monitor)]


def pruned_at_epoch(callbacks: list[Callback]) -> int | None:
    """The epoch after which the run's trial was pruned, or None."""
    for callback in callbacks:
        if isinstance(callback, TrialPruning):
            return callback.pruned_at_epoch
    return None
