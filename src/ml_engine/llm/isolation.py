"""Run a job's model work in a child process.

A crash inside llama.cpp (a corrupt GGUF, an abort, running out of memory) then ends only the
child: the job becomes a failed row with the reason and the sweep goes on. The child's exit also
returns all of its memory, so a long sweep does not grow. The child imports only what the work
needs (numpy, llama_cpp), not Hydra or the training stack, to keep per-job start-up low.

Protocol: the parent writes ``{"target": "module:function", "payload": {...}}`` as JSON to the
child's stdin; the child writes ``{"status": "ok"|"user_error"|"error", ...}`` to a result file.
The child's stdout and stderr (llama.cpp's own messages) go to a log file in the run dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm import progress
from ml_engine.run.files import remove_partials_of, write_text_atomic
from ml_engine.run.helpers import error_summary, import_callable, with_user_omp_policy


class WorkerFailed(UserError):
    """The child process died or failed; the message names how and llama.cpp's last words."""


def _last_log_line(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    meaningful = [line.strip() for line in lines if line.strip()]
    return meaningful[-1][:300] if meaningful else ""


def describe_exit(returncode: int) -> str:
    """How a child process ended, in words: "exited with status N" or "killed by SIGKILL"."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def run_isolated(
    target: str,
    payload: dict[str, Any],
    *,
    log_path: Path,
    timeout_s: float,
    cleanup_dirs: tuple[Path, ...] = (),
) -> Any:
    """Run ``target(payload)`` in a fresh interpreter and return its value.

    A ``UserError`` raised in the child is raised here with the same message; a crash or
    timeout raises ``WorkerFailed``. Files the child left half-written under ``cleanup_dirs``
    are removed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path = log_path.with_name(log_path.stem + ".result.json")
    result_path.unlink(missing_ok=True)
    env = worker_env()
    request = json.dumps({"target": target, "payload": payload, "result": str(result_path)})
    # the child's stdout is the log file: its progress comes back through a pipe of its own
    progress_read, progress_write = os.pipe()
    env[progress.PROGRESS_FD_ENV] = str(progress_write)
    with log_path.open("ab") as log:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "ml_engine.llm.isolation"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(progress_write,),
            )
        finally:
            os.close(progress_write)
        relaying = _relay_progress(progress_read)
        try:
            child.communicate(request.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            _cleanup(cleanup_dirs, child.pid)
            raise WorkerFailed(
                f"model work exceeded worker.timeout_s={timeout_s:g} and was stopped"
            ) from None
        finally:
            relaying.join(timeout=5)
    if not result_path.is_file():
        _cleanup(cleanup_dirs, child.pid)
        last = _last_log_line(log_path)
        raise WorkerFailed(
            f"model worker {describe_exit(child.returncode)}" + (f": {last}" if last else "")
        )
    outcome = json.loads(result_path.read_text())
    result_path.unlink(missing_ok=True)
    if outcome["status"] == "ok":
        return outcome["value"]
    _cleanup(cleanup_dirs, child.pid)
    if outcome["status"] == "user_error":
        raise UserError(outcome["message"])
    raise WorkerFailed(f"model worker failed: {outcome['message']}")


def _relay_progress(fd: int) -> threading.Thread:
    """Shows the child's progress events until it closes its end (by exiting)."""

    def relay_all() -> None:
        with os.fdopen(fd, encoding="utf-8", errors="replace") as events:
            for line in events:
                progress.relay(line)

    thread = threading.Thread(target=relay_all, name="worker-progress", daemon=True)
    thread.start()
    return thread


def _cleanup(directories: tuple[Path, ...], pid: int) -> None:
    for directory in directories:
        remove_partials_of(Path(directory), pid)


def worker_env() -> dict[str, str]:
    """The environment of a llama.cpp worker process: this package importable, output
    unbuffered, and the user's own OpenMP wait policy (not the PASSIVE set for torch)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _python_path()}
    return with_user_omp_policy(env)


def _python_path() -> str:
    # The child must import this same ml_engine, installed or not.
    source_root = str(Path(__file__).resolve().parents[2])
    existing = os.environ.get("PYTHONPATH")
    return source_root + (os.pathsep + existing if existing else "")


def call_target(target: str, payload: dict[str, Any]) -> Any:
    return import_callable(target)(payload)


def _child_main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        outcome = {"status": "ok", "value": call_target(request["target"], request["payload"])}
    except UserError as exc:
        outcome = {"status": "user_error", "message": str(exc)}
    except Exception as exc:
        traceback.print_exc()
        outcome = {"status": "error", "message": error_summary(exc)}
    write_text_atomic(Path(request["result"]), json.dumps(outcome, default=str))


if __name__ == "__main__":
    _child_main()
