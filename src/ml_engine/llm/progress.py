"""Progress of a generation job's long phases: quantizing, loading, generating, llama-bench's
tests, quality scoring.

A rich bar on a terminal; plain lines when stdout is redirected (as training prints them): the
first step's line (with an ETA as soon as one step is timed), a few lines per phase and one at
least every ``max_interval_s`` seconds, then a ``done`` line with the phase's time.

The model work runs in a worker process whose stdout is a log file, so there the phases are sent
as JSON lines through the file descriptor named by ``ML_ENGINE_PROGRESS_FD`` and the parent
(``isolation.run_isolated``) shows them with ``relay``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

PROGRESS_FD_ENV = "ML_ENGINE_PROGRESS_FD"
LINES_PER_PHASE = 4
MAX_INTERVAL_S = 30.0
# a worker sends at most this many updates a second: its parent redraws, it need not
SEND_INTERVAL_S = 0.2


def duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 40 s``, ``1 h 05 min``: as a user reads a wait."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def rate_text(per_s: float) -> str:
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2g}"


@dataclass
class PhaseState:
    """One phase as a sink sees it; ``total`` None: no count known (a heartbeat only)."""

    label: str
    total: int | None
    unit: str
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    last_line: float = 0.0
    lines: int = 0

    def eta_s(self) -> float:
        if self.total is None or self.done <= 0:
            return math.nan
        elapsed = time.monotonic() - self.started
        return elapsed / self.done * max(self.total - self.done, 0)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.total is None:
            return f"{self.label}: {duration(elapsed)} so far"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = f", {rate_text(self.done / elapsed)} {self.unit}/s" if elapsed > 0 else ""
        eta = duration(self.eta_s()) if self.done else "? (timing the first)"
        return f"{self.label}: {self.done}/{self.total} {self.unit}{share}{rate}, ETA {eta}"

    def done_line(self) -> str:
        elapsed = duration(time.monotonic() - self.started)
        if self.total is None:
            return f"{self.label}: done in {elapsed}"
        return f"{self.label}: {self.done}/{self.total} {self.unit} done in {elapsed}"


class Sink(Protocol):
    def start(self, key: int, label: str, total: int | None, unit: str) -> None: ...
    def update(self, key: int, done: int) -> None: ...
    def finish(self, key: int, done: int | None) -> None: ...


class PlainSink:
    """Plain lines on stdout; a ticker thread keeps a line coming at least every
    ``max_interval_s`` while a phase sits inside one long step (or has no count at all)."""

    def __init__(
        self, lines_per_phase: int = LINES_PER_PHASE, max_interval_s: float = MAX_INTERVAL_S
    ) -> None:
        self.lines_per_phase = max(1, lines_per_phase)
        self.max_interval_s = max_interval_s
        self.phases: dict[int, PhaseState] = {}
        self.lock = threading.Lock()
        self.ticker: threading.Thread | None = None

    def _print(self, phase: PhaseState, text: str) -> None:
        phase.last_line, phase.lines = time.monotonic(), phase.lines + 1
        print(text, flush=True)

    def start(self, key: int, label: str, total: int | None, unit: str) -> None:
        with self.lock:
            phase = self.phases[key] = PhaseState(label, total, unit)
            if total is None:
                self._print(phase, f"{label} …")
            self._start_ticker()

    def _due(self, phase: PhaseState, previous: int) -> bool:
        if phase.total is None or phase.done >= phase.total or phase.done == 0:
            return False  # nothing timed yet, or the done line follows
        if phase.lines == 0:
            return True  # the first timed step gives the first ETA
        every = math.ceil(phase.total / self.lines_per_phase)
        return phase.done // every > previous // every

    def update(self, key: int, done: int) -> None:
        with self.lock:
            phase = self.phases.get(key)
            if phase is None:
                return
            previous, phase.done = phase.done, done
            if self._due(phase, previous):
                self._print(phase, phase.line())

    def finish(self, key: int, done: int | None) -> None:
        with self.lock:
            phase = self.phases.pop(key, None)
            if phase is None:
                return
            if done is not None:
                phase.done = done
            self._print(phase, phase.done_line())

    def _start_ticker(self) -> None:
        if self.ticker is None or not self.ticker.is_alive():
            self.ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self.ticker.start()

    def _tick(self) -> None:
        while True:
            time.sleep(min(1.0, self.max_interval_s))
            with self.lock:
                if not self.phases:
                    return
                now = time.monotonic()
                for phase in self.phases.values():
                    if now - max(phase.last_line, phase.started) >= self.max_interval_s:
                        self._print(phase, phase.line())


class RichSink:
    """One rich bar per phase, left on screen when it ends."""

    def __init__(self) -> None:
        self.bars: dict[int, Any] = {}

    def start(self, key: int, label: str, total: int | None, unit: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        if total is not None:
            columns += [MofNCompleteColumn(), TextColumn(unit), TextColumn("ETA")]
            columns.append(TimeRemainingColumn())
        columns.append(TimeElapsedColumn())
        bar = Progress(*columns)
        bar.start()
        bar.add_task(label, total=total)
        self.bars[key] = bar

    def update(self, key: int, done: int) -> None:
        bar = self.bars.get(key)
        if bar is not None:
            bar.update(bar.task_ids[0], completed=done)

    def finish(self, key: int, done: int | None) -> None:
        bar = self.bars.pop(key, None)
        if bar is None:
            return
        task = bar.tasks[0]
        bar.update(task.id, completed=done if done is not None else task.total or 0)
        if task.total is None:
            bar.update(task.id, total=1, completed=1)
        bar.stop()


class PipeSink:
    """A worker's side: JSON lines to the parent, updates at most every ``SEND_INTERVAL_S``."""

    def __init__(self, fd: int) -> None:
        self.stream = os.fdopen(fd, "w", buffering=1, closefd=False)
        self.sent: dict[int, float] = {}

    def _send(self, **event: Any) -> None:
        # the parent gone: the work itself goes on and reports through its result file
        with suppress(OSError, ValueError):
            self.stream.write(json.dumps(event) + "\n")

    def start(self, key: int, label: str, total: int | None, unit: str) -> None:
        self.sent[key] = 0.0
        self._send(event="start", key=key, label=label, total=total, unit=unit)

    def update(self, key: int, done: int) -> None:
        now = time.monotonic()
        if done > 1 and now - self.sent.get(key, 0.0) < SEND_INTERVAL_S:
            return
        self.sent[key] = now
        self._send(event="update", key=key, done=done)

    def finish(self, key: int, done: int | None) -> None:
        self.sent.pop(key, None)
        self._send(event="finish", key=key, done=done)


_sink: Sink | None = None
_keys = iter(range(1, 1 << 62))


def sink() -> Sink:
    """This process's sink: the parent's pipe in a worker, else by stdout's kind."""
    global _sink
    if _sink is None:
        fd = os.environ.get(PROGRESS_FD_ENV)
        if fd and fd.isdigit():
            _sink = PipeSink(int(fd))
        else:
            _sink = RichSink() if sys.stdout.isatty() else PlainSink()
    return _sink


class Phase:
    """A running phase: ``advance()`` per unit done, or ``set(done)``."""

    def __init__(self, key: int, target: Sink) -> None:
        self.key, self.target, self.done = key, target, 0

    def advance(self, count: int = 1) -> None:
        self.set(self.done + count)

    def set(self, done: int) -> None:
        self.done = done
        self.target.update(self.key, done)


@contextmanager
def phase(label: str, total: int | None = None, unit: str = "steps") -> Iterator[Phase]:
    """Report ``label`` while the block runs; ``total`` None when there is nothing to count."""
    target = sink()
    key = next(_keys)
    target.start(key, label, total, unit)
    running = Phase(key, target)
    try:
        yield running
    finally:
        target.finish(key, running.done if total is not None else None)


def relay(line: str) -> None:
    """Show one event a worker sent (a torn or foreign line is skipped)."""
    try:
        event = json.loads(line)
        kind, key = event["event"], int(event["key"])
    except (ValueError, KeyError, TypeError):
        return
    target = sink()
    key = -key  # the worker counts its own phases: keep them apart from this process's
    if kind == "start":
        target.start(key, str(event["label"]), event.get("total"), str(event.get("unit", "")))
    elif kind == "update":
        target.update(key, int(event["done"]))
    elif kind == "finish":
        target.finish(key, event.get("done"))
