"""A Lightning callback that reports a training job's progress to the server through a file.

The server starts ``train.py`` with ``+callbacks.job_progress={_target_: <this class>}``; the
callback writes ``progress.json`` (atomically) into the run dir, and the server reads it. A file,
not a socket, so a job keeps running (and its progress stays readable) across a server restart.

It also appends the curves' points to ``curves.jsonl``, one JSON line per training step
(``*_step`` metrics) and per epoch (the epoch's aggregated metrics), so the server can draw loss
and accuracy whatever experiment logger the job uses (jobs may run with ``logger=none``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ml_engine.run.files import write_json_atomic
from ml_engine.run.helpers import finite_or_none

PROGRESS_FILE = "progress.json"
CURVES_FILE = "curves.jsonl"
STEP_SUFFIX = "_step"


def _step_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if key.endswith(STEP_SUFFIX)}


def _epoch_metrics(metrics: dict[str, float], validated: bool) -> dict[str, float]:
    """The epoch's aggregated metrics; ``val/*`` only when validation ran in this epoch (its
    values would otherwise repeat the last validation's), and no ``*_best`` running maxima
    (a staircase of the curve beside it)."""
    return {
        key: value
        for key, value in metrics.items()
        if not key.endswith(STEP_SUFFIX)
        and not key.endswith("_best")
        and (validated or not key.startswith("val/"))
    }


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    values = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        number = finite_or_none(value)
        if number is not None:
            values[key] = number
    return values


class JobProgress(L.Callback):
    """Epoch/step progress and the latest metrics, at most every ``min_interval_s`` seconds."""

    def __init__(self, min_interval_s: float = 0.5) -> None:
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self._stage = "starting"
        self._epochs_done = 0
        self._validated = False
        self._last_rates: dict[str, float] = {}

    def _write(self, trainer: L.Trainer, force: bool = False) -> None:
        now = time.monotonic()
        if not trainer.is_global_zero or (
            not force and now - self._last_write < self.min_interval_s
        ):
            return
        self._last_write = now
        batches = trainer.num_training_batches
        progress = {
            "stage": self._stage,
            "epoch": self._epoch(trainer),
            "epochs_done": self._epochs_done,
            "max_epochs": trainer.max_epochs,
            "step": trainer.global_step,
            "batch": trainer.fit_loop.epoch_loop.batch_progress.current.completed,
            "batches_per_epoch": batches if isinstance(batches, int) else None,
            "metrics": _scalars(dict(trainer.callback_metrics)),
            "updated_at": time.time(),
        }
        write_json_atomic(Path(trainer.default_root_dir) / PROGRESS_FILE, progress)

    @staticmethod
    def _append_point(trainer: L.Trainer, kind: str, x: int, metrics: dict[str, float]) -> None:
        """One line per point, appended: a reader sees every point written so far, and one
        torn last line at worst (which it skips)."""
        if not trainer.is_global_zero or not metrics:
            return
        line = json.dumps({"kind": kind, "x": x, "metrics": metrics}, allow_nan=False)
        with (Path(trainer.default_root_dir) / CURVES_FILE).open("a") as handle:
            handle.write(line + "\n")

    @staticmethod
    def _epoch(trainer: L.Trainer) -> int:
        """The epoch in progress, 1-based as a user counts them (never past the last one)."""
        epoch = trainer.current_epoch + 1
        limit = trainer.max_epochs
        return min(epoch, limit) if limit is not None and limit > 0 else epoch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage = "fit"
        if trainer.is_global_zero:  # a fresh fit draws fresh curves
            (Path(trainer.default_root_dir) / CURVES_FILE).unlink(missing_ok=True)
        self._write(trainer, force=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        metrics = _step_metrics(_scalars(dict(trainer.callback_metrics)))
        self._append_point(trainer, "step", trainer.global_step, metrics)
        self._append_rates(trainer)
        self._write(trainer)

    def _append_rates(self, trainer: L.Trainer) -> None:
        """The learning rates by step, named as LearningRateMonitor names them (``lr-AdamW``),
        a point whenever one changed: a per-step schedule (one-cycle) draws its whole curve,
        a constant one a single point."""
        rates = {}
        for index, optimizer in enumerate(trainer.optimizers):
            suffix = f"-{index}" if len(trainer.optimizers) > 1 else ""
            rates[f"lr-{type(optimizer).__name__}{suffix}"] = optimizer.param_groups[0]["lr"]
        rates = _scalars(rates)
        if rates and rates != self._last_rates:
            self._last_rates = rates
            self._append_point(trainer, "lr", trainer.global_step, rates)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True
            self._write(trainer, force=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs_done = trainer.current_epoch + 1
        metrics = _epoch_metrics(_scalars(dict(trainer.callback_metrics)), self._validated)
        self._append_point(trainer, "epoch", self._epochs_done, metrics)
        self._validated = False
        self._write(trainer, force=True)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage = "test"
        self._write(trainer, force=True)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage = "done"
        self._write(trainer, force=True)
