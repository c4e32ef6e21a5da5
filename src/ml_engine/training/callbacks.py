"""Lightning callbacks of our own."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from torch import Tensor

from ml_engine.errors import UserError
from ml_engine.run.files import atomic_path, partial_path


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files appear whole or not at all, and where, with
    ``later_wins_ties``, an epoch that equals the kept best score replaces it.

    Lightning writes straight to the final path, so a run killed mid-save (SIGKILL, power loss)
    can leave a truncated ``last.ckpt`` that a resume then cannot read. Writing to a temp file
    and renaming keeps the previous checkpoint intact until the new one is complete.

    Lightning keeps the first epoch that reached the best score. Accuracy on a small validation
    split takes few values (250 digits: steps of 0.4 %), so ties are common, and under a
    schedule that anneals the learning rate the later of two tied epochs is the better network.
    (The default config monitors nothing, so best.ckpt is the last epoch's: see
    ``conf/callbacks/model_checkpoint.yaml``.)
    """

    def __init__(self, *args: Any, later_wins_ties: bool = False, **kwargs: Any) -> None:
        if not isinstance(later_wins_ties, bool):
            raise UserError(
                f"callbacks.model_checkpoint.later_wins_ties={later_wins_ties!r} is not valid; "
                "expected true or false"
            )
        super().__init__(*args, **kwargs)
        self.later_wins_ties = later_wins_ties

    def check_monitor_top_k(self, trainer: L.Trainer, current: Tensor | None = None) -> bool:
        if (
            self.later_wins_ties
            and current is not None
            and self.save_top_k > 0
            and len(self.best_k_models) >= self.save_top_k
            and bool(torch.eq(current, self.best_k_models[self.kth_best_model_path]))
        ):
            return trainer.strategy.reduce_boolean_decision(True)
        return super().check_monitor_top_k(trainer, current)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        # Every rank calls save_checkpoint (it synchronizes them); only rank zero writes a file.
        if trainer.is_global_zero:
            with atomic_path(final) as tmp:
                trainer.save_checkpoint(str(tmp), self.save_weights_only)
        else:
            trainer.save_checkpoint(str(partial_path(final)), self.save_weights_only)
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


def _format_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _batch_size(batch: Any) -> int | None:
    """Samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _batch_size(next(iter(batch.values())))
    return None


class PlainProgressBar(ProgressBar):
    """Progress as plain lines, for output that is not a terminal (CI logs, nohup, schedulers).

    A redrawn bar there shows only its final state, wrapped into a narrow column; these lines
    say how far each epoch is, how fast it goes and what the metrics are, a few times per epoch
    (``lines_per_epoch``) and at least every ``max_interval_s`` seconds, then once per epoch
    with the validation metrics.
    """

    def __init__(self, lines_per_epoch: int = 4, max_interval_s: float = 30.0) -> None:
        super().__init__()
        self.lines_per_epoch = max(1, int(lines_per_epoch))
        self.max_interval_s = float(max_interval_s)
        self._enabled = True
        self._epoch_started = self._last_line_at = 0.0
        self._samples = self._steps = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _epoch_label(self, trainer: L.Trainer) -> str:
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {trainer.current_epoch + 1}{total}"

    def _rates(self, steps: int) -> str:
        elapsed = max(time.perf_counter() - self._epoch_started, 1e-9)
        rates = f"{steps / elapsed:.1f} steps/s"
        if self._samples:
            rates += f" {self._samples / elapsed:.0f} samples/s"
        return rates

    def _line_due(self, done: int, total: float) -> bool:
        if done >= total:
            return False  # the epoch line follows
        every = math.ceil(total / self.lines_per_epoch) if math.isfinite(total) else 50
        overdue = time.perf_counter() - self._last_line_at >= self.max_interval_s
        return done % every == 0 or overdue

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = self._last_line_at = time.perf_counter()
        self._samples = self._steps = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._samples += _batch_size(batch) or 0
        self._steps += 1
        done, total = batch_idx + 1, self.total_train_batches
        if not self.is_enabled or not self._line_due(done, total):
            return
        shown_total = f"/{total} ({100 * done / total:.0f}%)" if math.isfinite(total) else ""
        # per-step values only: epoch-level ones would repeat the previous epoch's
        step_metrics = {
            k: v for k, v in trainer.progress_bar_metrics.items() if k.endswith("_step")
        }
        metrics = _format_metrics(step_metrics)
        self.print(
            f"{self._epoch_label(trainer)} step {done}{shown_total} {self._rates(done)} {metrics}"
        )
        self._last_line_at = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        steps = self._steps
        epoch_metrics = {
            k: v for k, v in trainer.callback_metrics.items() if not k.endswith("_step")
        }
        seconds = time.perf_counter() - self._epoch_started
        self.print(
            f"{self._epoch_label(trainer)} done: {steps} steps in {seconds:.1f} s "
            f"({self._rates(steps)}) {_format_metrics(epoch_metrics)}"
        )

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs, flush=True)


def progress_bar(
    style: str = "auto",
    refresh_rate: int = 10,
    lines_per_epoch: int = 4,
    max_interval_s: float = 30.0,
) -> ProgressBar:
    """The rich bar on a terminal, plain progress lines when stdout is redirected (``auto``)."""
    if style not in ("auto", "rich", "plain"):
        raise UserError(f"progress bar style={style!r} is not valid; accepted: auto, rich, plain")
    if style == "rich" or (style == "auto" and sys.stdout.isatty()):
        return RichProgressBar(refresh_rate=refresh_rate)
    return PlainProgressBar(lines_per_epoch=lines_per_epoch, max_interval_s=max_interval_s)


def model_summary(max_depth: int = 1) -> Callback:
    """Rich's table on a terminal, Lightning's plain text table when stdout is redirected."""
    if sys.stdout.isatty():
        return lightning_callbacks.RichModelSummary(max_depth=max_depth)
    return lightning_callbacks.ModelSummary(max_depth=max_depth)
