"""Which accelerators this machine has, checked before a Trainer is built."""

from __future__ import annotations

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
