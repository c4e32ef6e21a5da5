"""What every LightningModule of ours shares: optimizer and scheduler from Hydra nodes, completed in
``configure_optimizers``, and a one-cycle plan that follows a resumed run's new length."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate

from ml_engine.errors import UserError
from ml_engine.training.registry import MODULE_CLASS_KEY

log = logging.getLogger(__name__)


class ConfiguredOptimizers(L.LightningModule):
    """Base class: ``self.hparams`` holds ``optimizer`` and ``scheduler`` (Hydra nodes with
    ``_partial_: true``) and ``scheduler_interval``. Schedulers that take ``total_steps``
    (one-cycle) get the trainer's estimate of it."""

    def __init__(self) -> None:
        super().__init__()
        # total_steps the resumed run's schedulers had planned; compared once training starts
        self._planned_total_steps: list[int | None] = []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[MODULE_CLASS_KEY] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Let step-planned schedulers (one-cycle) keep the length planned for *this* run.

        A resumed run may be longer than the one that wrote the checkpoint (a larger
        ``trainer.max_epochs`` or ``max_steps``). The saved ``total_steps`` and the phases
        derived from it would overwrite the new plan and the scheduler would fail past the old
        end; dropping them keeps the plan ``configure_optimizers`` made for the new length, at
        the saved step.
        """
        self._planned_total_steps = []
        for state in checkpoint.get("lr_schedulers", []):
            self._planned_total_steps.append(state.pop("total_steps", None))
            if self._planned_total_steps[-1] is not None:
                state.pop("_schedule_phases", None)

    def on_train_start(self) -> None:
        self._report_replanned_schedules()

    def _report_replanned_schedules(self) -> None:
        configs = self.trainer.lr_scheduler_configs
        for config, was in zip(configs, self._planned_total_steps, strict=False):
            now = getattr(config.scheduler, "total_steps", None)
            if was is not None and now is not None and now <= self.global_step:
                raise UserError(
                    f"cannot resume at step {self.global_step}: this run plans only {now} "
                    f"steps for {type(config.scheduler).__name__} (the checkpoint planned {was}); "
                    "raise trainer.max_epochs (or trainer.max_steps)"
                )
            if was is not None and now != was and self.trainer.is_global_zero:
                log.info(
                    "resuming at step %d: %s re-planned for %d total steps (was %d)",
                    self.global_step,
                    type(config.scheduler).__name__,
                    now,
                    was,
                )
        self._planned_total_steps = []

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return {"optimizer": optimizer}
        make_scheduler = instantiate(self.hparams.scheduler)
        extra: dict[str, Any] = {}
        wants_steps = "total_steps" in inspect.signature(make_scheduler.func).parameters
        if wants_steps and "total_steps" not in make_scheduler.keywords:
            extra["total_steps"] = int(self.trainer.estimated_stepping_batches)
        try:
            scheduler = make_scheduler(optimizer=optimizer, **extra)
        except ZeroDivisionError as exc:  # one-cycle with a warm-up phase of under one step
            name = make_scheduler.func.__name__
            raise UserError(
                f"{name} cannot plan {extra.get('total_steps')} steps (a phase shorter than one "
                "step); train for more steps or set model.scheduler=null"
            ) from exc
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval},
        }
