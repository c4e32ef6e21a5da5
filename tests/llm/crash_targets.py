"""Work functions for the isolation tests, imported by the child process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.run.files import partial_path


def abort_after_half_a_write(payload: dict[str, Any]) -> None:
    """Leave a half-written cache file, then die as llama.cpp does on a failed assertion."""
    partial_path(Path(payload["target"])).write_bytes(b"half a model")
    os.abort()


def raise_user_error(payload: dict[str, Any]) -> None:
    raise UserError(payload["message"])


def raise_bug(payload: dict[str, Any]) -> None:
    raise ZeroDivisionError("division by zero\nsecond line")


def sleep(payload: dict[str, Any]) -> None:
    time.sleep(payload["seconds"])


def echo_pid(payload: dict[str, Any]) -> dict[str, Any]:
    return {"pid": os.getpid(), **payload}
