"""Lightning callbacks of our own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files appear whole or not at all.

    Lightning writes straight to the final path, so a run killed mid-save (SIGKILL, power loss)
    can leave a truncated ``last.ckpt`` that a resume then cannot read. Writing to a temp file
    and renaming keeps the previous checkpoint intact until the new one is complete.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        tmp = final.with_name(f".{final.name}.tmp")
        trainer.save_checkpoint(str(tmp), self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, final)
        trainer.strategy.barrier("atomic_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


class LearningRateMonitor(lightning_callbacks.LearningRateMonitor):
    """Lightning's LearningRateMonitor that stands aside when the run has no logger.

    Lightning's raises in that case, which would make ``logger=none`` fail with the default
    callbacks.
    """

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class RichProgressBar(lightning_callbacks.RichProgressBar):
    """Lightning's rich progress bar, redrawn every ``refresh_rate`` training batches.

    Lightning's own gathers the metrics and redraws after every batch whatever ``refresh_rate``
    says, which on a small network costs a noticeable share of each step.
    """

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        done = batch_idx + 1
        if done % max(1, int(self.refresh_rate)) == 0 or done == self.total_train_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
