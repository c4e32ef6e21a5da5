"""llama.cpp's log: captured into a ring buffer, and read for why a file would not load.

llama.cpp reports through one process-wide log callback, not through return values: the backend
(a model's load), the quantizer and the GGUF probe (``models.probe_gguf``) all read their failures
from here, so this sits below all three.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_LOG_TAIL: deque[str] = deque(maxlen=40)
_log_callback = None  # kept referenced: llama.cpp calls it from C
# llama.cpp logs a model's load in the thread that loads it: each load collects its own lines
_loading = threading.local()
_LOAD_REPORT_MARKERS = ("assigned to device", "layers to GPU", "Flash Attention")


def capture_llama_logs(echo: bool = False) -> None:
    """Route llama.cpp's log lines into a ring buffer, so a failed load can say why in one line,
    and a loading thread's placement lines into that load's report."""
    global _log_callback
    import llama_cpp

    if _log_callback is not None and not echo:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        # Every level is kept: the numbering of ggml's levels differs between versions.
        _LOG_TAIL.append(line.strip())
        report = getattr(_loading, "lines", None)
        if report is not None and any(marker in line for marker in _LOAD_REPORT_MARKERS):
            report.append(line.strip())
        if echo:
            sys.stderr.write(line)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def installed_callback() -> Any:
    """The callback ``capture_llama_logs`` installed (None before), for a temporary listener to
    forward to and restore."""
    return _log_callback


@contextlib.contextmanager
def load_report() -> Iterator[list[str]]:
    """One load's log: the ring buffer starts empty (a failure reads only its own lines), and
    the list yielded collects the placement lines this thread logs inside the block."""
    _LOG_TAIL.clear()
    lines: list[str] = []
    _loading.lines = lines
    try:
        yield lines
    finally:
        _loading.lines = None


def last_llama_error() -> str:
    """llama.cpp's latest error line, e.g. "tensor '…' data is not within the file bounds"."""
    for line in reversed(_LOG_TAIL):
        if "error" in line.lower():
            return line.split("error loading model: ")[-1]
    return ""


# llama.cpp's loader ends every failed read of a file with this line; the reason is a line before
_GENERIC_LOAD_FAILURE = "failed to load model from"


def llama_load_reason() -> str:
    """Why llama.cpp could not read a model file, in its own words: the specific line
    ("invalid magic characters: 'not ', expected 'GGUF'") rather than the generic one after it."""
    lines = list(_LOG_TAIL)
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        if "error loading model: " not in line:
            continue
        reason = line.split("error loading model: ")[-1]
        if _GENERIC_LOAD_FAILURE not in reason:
            return reason
        # gguf_init_from_reader/gguf_init_from_file_impl said what was wrong just before
        for earlier in reversed(lines[:index]):
            if earlier.startswith("gguf_init"):
                return earlier.split(": ", 1)[-1]
        return reason
    return last_llama_error()


def load_failure(path: Path, reason: str) -> str:
    """One line naming the file, what the reason means, and llama.cpp's own reason."""
    lowered = reason.lower()
    if "invalid magic" in lowered:
        meaning = "not a GGUF file"
    elif "unknown model architecture" in lowered:
        import llama_cpp

        meaning = (
            "an architecture this llama.cpp build does not know; llama-cpp-python "
            f"{llama_cpp.__version__}"
        )
    elif "file bounds" in lowered or "failed to read" in lowered:
        meaning = "corrupt or truncated GGUF"
    else:
        meaning = "corrupt or truncated GGUF?"
    return f"llama.cpp could not load {path} ({meaning}): {reason or 'no reason logged'}"
