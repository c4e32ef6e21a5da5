"""A callback that holds a test job at one training step until the test lets it go.

A job of 50 short steps can finish between two polls of its curves; holding it makes "the
curves grow while it trains" something a test can observe on any machine, fast or slow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L


class HoldAtStep(L.Callback):
    """After training step ``step``, wait until the file ``release`` exists (or fail)."""

    def __init__(self, step: int, release: str, timeout_s: float = 120.0) -> None:
        self.step = step
        self.release = Path(release)
        self.timeout_s = timeout_s

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step != self.step:
            return
        deadline = time.monotonic() + self.timeout_s
        while not self.release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.release} never appeared")
            time.sleep(0.02)
