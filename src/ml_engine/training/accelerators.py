"""Which accelerators this machine has, checked before a Trainer is built.

The device names themselves are listed once, in training/choices.py (ACCELERATORS).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ml_engine.errors import UserError
from ml_engine.training.choices import ACCELERATORS


def device_type_present(kind: str) -> bool:
    """Whether this machine has a device of torch type ``kind`` ("auto" always works)."""
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind in ("cpu", "auto")


def usable_accelerators() -> tuple[str, ...]:
    """Every accelerator name, aliases and ``auto`` included, that works on this machine."""
    return tuple(name for name, kind in ACCELERATORS.items() if device_type_present(kind))


def available_accelerators() -> list[str]:
    """The devices present, one name each (``gpu`` for CUDA), without ``auto``."""
    names: dict[str, str] = {}
    for name, kind in ACCELERATORS.items():
        if kind != "auto" and device_type_present(kind):
            names.setdefault(kind, name)
    return list(names.values())


def check_accelerator(requested: str | None) -> None:
    """A UserError naming the accelerators present when ``requested`` is not one of them."""
    if requested is None or not isinstance(requested, str):
        return  # an Accelerator instance: Lightning checks it
    kind = ACCELERATORS.get(requested.lower())
    available = available_accelerators()
    if kind is None:
        accepted = "auto, " + ", ".join(available)
        raise UserError(
            f"trainer.accelerator='{requested}' is not known; accepted here: {accepted}"
        )
    if not device_type_present(kind):
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
    kind = ACCELERATORS.get(requested.lower())
    on_cpu = kind == "cpu" or (kind == "auto" and not torch.cuda.is_available())
    if on_cpu or kind == "mps":
        raise UserError(
            f"trainer.sync_batchnorm=true needs CUDA GPUs, but trainer.accelerator='{requested}' "
            "runs on " + ("MPS" if kind == "mps" else "CPU") + "; set trainer.sync_batchnorm=false"
        )
