"""Which accelerators this machine has, checked before a Trainer is built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ml_engine.errors import UserError

_ALIASES = {"gpu": "cuda", "cuda": "cuda", "mps": "mps", "cpu": "cpu", "auto": "auto"}


def available_accelerators() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names.append("gpu")
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_accelerator(requested: str | None) -> None:
    """A UserError naming the accelerators present when ``requested`` is not one of them."""
    if requested is None or not isinstance(requested, str):
        return  # an Accelerator instance: Lightning checks it
    kind = _ALIASES.get(requested.lower())
    available = available_accelerators()
    if kind is None:
        accepted = "auto, " + ", ".join(available)
        raise UserError(
            f"trainer.accelerator='{requested}' is not known; accepted here: {accepted}"
        )
    missing = (kind == "cuda" and "gpu" not in available) or (
        kind == "mps" and "mps" not in available
    )
    if missing:
        what = "no CUDA GPU" if kind == "cuda" else "no Apple MPS device"
        raise UserError(
            f"trainer.accelerator='{requested}' but this machine has {what}; "
            f"available here: auto, {', '.join(available)}"
        )


def check_sync_batchnorm(trainer_cfg: Mapping[str, Any]) -> None:
    """SyncBatchNorm runs on CUDA only; refuse it up front instead of failing in every rank."""
    if not trainer_cfg.get("sync_batchnorm"):
        return
    requested = trainer_cfg.get("accelerator")
    if not isinstance(requested, str):
        return
    kind = _ALIASES.get(requested.lower())
    on_cpu = kind == "cpu" or (kind == "auto" and not torch.cuda.is_available())
    if on_cpu or kind == "mps":
        raise UserError(
            f"trainer.sync_batchnorm=true needs CUDA GPUs, but trainer.accelerator='{requested}' "
            "runs on " + ("MPS" if kind == "mps" else "CPU") + "; set trainer.sync_batchnorm=false"
        )
