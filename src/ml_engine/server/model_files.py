"""Whether a file found under a served folder (the runs folder) may be served as a model.

Only a regular file that really lives under the folder is: whoever can write into the runs
folder (a training job, a user copying runs around) must not be able to make the server load,
or hand to torch's unpickler, a file from anywhere else it can read. So a name is resolved
first (a symbolic link, or a run directory that is one, leads wherever it points) and the
result must still be under the folder. A hard link cannot be told apart from the file it
shares its bytes with, which may live anywhere on the same disk: a file with more than one
link is refused too (export.py and training write files with one link).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def refusal(path: Path, root: Path) -> str | None:
    """Why ``path``, found under ``root``, is not a file to serve; None when it is one. Never
    opens the file (a FIFO would block the reader)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return "a symbolic link to nothing" if path.is_symlink() else "it cannot be read"
    if not real.is_relative_to(root.resolve()):
        return f"it leads to {real}, outside {root}"
    try:
        info = os.stat(real)
    except OSError as error:
        return f"it cannot be read ({error.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return f"it is {_kind(info.st_mode)}, not a regular file"
    if info.st_nlink > 1:
        return (
            f"it has {info.st_nlink} hard links and may share its bytes with a file outside "
            f"{root}; copy it in instead"
        )
    return None
