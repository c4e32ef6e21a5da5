"""run/files.py: a write lands whole or not at all, and what a dead writer left is cleaned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ml_engine.run.files import (
    JOB_RECORD,
    atomic_path,
    atomic_write,
    partial_path,
    read_job_record,
    write_json_atomic,
    write_text_atomic,
)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _live_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_write_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "result.txt"
    write_text_atomic(target, "old\n")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]


def test_a_crash_mid_write_keeps_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.csv"
    write_text_atomic(target, "old\n")

    def crash(handle) -> None:
        handle.write("half a ")
        handle.flush()
        assert partial_path(target).is_file()  # the half-written bytes live in the temp file
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, crash)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_a_crash_inside_atomic_path_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "best.ckpt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but incomplete")
        raise RuntimeError("killed mid-save")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]


def test_a_first_write_that_crashes_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / JOB_RECORD

    def crash(handle) -> None:
        handle.write("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert list(tmp_path.iterdir()) == []
    assert read_job_record(tmp_path) is None


def test_a_dead_writers_partial_is_cleaned_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / JOB_RECORD
    stale = partial_path(target, _dead_pid())
    stale.write_text('{"status": ')  # what a writer killed between write and rename leaves
    other_file = partial_path(tmp_path / "progress.json", _dead_pid())
    other_file.write_text("{")
    live = _live_process()
    try:
        in_flight = partial_path(target, live.pid)  # another process writing it right now
        in_flight.write_text("{")
        write_json_atomic(target, {"status": "ok", "metrics": {"val/acc": 0.5}})
        assert not stale.exists()
        assert in_flight.exists(), "a live writer's temp file must be left alone"
        assert other_file.exists(), "only partials of the file being written are cleaned"
    finally:
        live.kill()
        live.wait()
    assert read_job_record(tmp_path) == {"status": "ok", "metrics": {"val/acc": 0.5}}


def test_binary_writes(tmp_path: Path) -> None:
    target = tmp_path / "cache.npz"
    atomic_write(target, lambda handle: handle.write(b"\x00\x01"), binary=True)
    assert target.read_bytes() == b"\x00\x01"
