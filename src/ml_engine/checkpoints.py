"""Loading checkpoints with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import torch

from ml_engine.errors import UserError
from ml_engine.module import ClassifierModule


def resolve_checkpoint(
    path: str | None, accepted: str = "a .ckpt file written by train.py"
) -> Path:
    """``path`` as an existing file, or a UserError naming what was looked at."""
    if not path:
        raise UserError(
            f"ckpt_path is required; give {accepted}, e.g. ckpt_path=outputs/.../best.ckpt"
        )
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise UserError(f"checkpoint not found: {resolved} (expected {accepted})")
    return resolved


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> ClassifierModule:
    """A ClassifierModule rebuilt from its checkpoint alone; corrupt files end in a UserError."""
    checkpoint = resolve_checkpoint(str(path))
    try:
        model = ClassifierModule.load_from_checkpoint(str(checkpoint), map_location=map_location)
    except UserError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise UserError(
            f"could not load checkpoint {checkpoint} ({reason}) "
            "(expected a Lightning .ckpt of a ml_engine classifier written by train.py)"
        ) from exc
    return model.eval()
