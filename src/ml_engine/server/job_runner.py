"""Training jobs as ``python train.py ...`` subprocesses: queue, progress, cancel, recovery.

Each job runs through the same entrypoint a user runs, in its own process group, so a crash
(or an out-of-memory kill) in training cannot take the server down, and cancelling a job ends
every process it started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ml_engine.run.files import read_job_record
from ml_engine.run.locations import PROJECT_ROOT
from ml_engine.server.errors import StorageFull, is_no_space
from ml_engine.server.jobs_store import (
    CANCELLED,
    FAILED,
    FINAL_STATUSES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobStore,
    new_job_id,
)
from ml_engine.training.progress import PROGRESS_FILE

log = logging.getLogger(__name__)

# the train entrypoint of the package, so that jobs run from an installed wheel too
TRAIN_COMMAND = (sys.executable, "-m", "ml_engine", "train")
OUTPUT_LOG = "stdout.log"
PROGRESS_CALLBACK = "+callbacks.job_progress={_target_:ml_engine.training.progress.JobProgress}"
# request field → training config key; only these reach the command line. A device is a
# Lightning accelerator name (training/choices.py ACCELERATORS), passed on as it is.
REQUEST_TO_OVERRIDE = {
    "device": "trainer.accelerator",
    "epochs": "trainer.max_epochs",
    "batch_size": "datamodule.batch_size",
    "lr": "model.optimizer.lr",
    "weight_decay": "model.optimizer.weight_decay",
    "seed": "seed",
    "data_source": "datamodule.source",
}
RESTART_ERROR = (
    "the server stopped while this job was running (it died or was killed); "
    "the training was stopped with it"
)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# less free space than this where a run writes is a full disk to a training job: its config
# copy, log and first checkpoint need more
MIN_FREE_BYTES = 1 << 20


def _die_with_server(server_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the training process die with the server (Linux).

    The kernel sends SIGTERM to the child the moment the server thread that started it ends,
    even on ``kill -9`` of the server: a job no server watches would otherwise train on,
    orphaned, and finish after its record was failed. The training process leads its own
    process group; processes it starts itself (DDP workers) are ended by Lightning when it
    exits, and any that linger are killed with the group at the next start (``_recover``).
    None where prctl is missing (not Linux): there the next start cleans up alone."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != server_pid:  # the server died between fork and prctl
            os._exit(1)

    return preexec


def _quoted(value: str) -> str:
    """A Hydra override value that stays one string whatever characters a path holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _size(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(int(v)) for v in value) + "]"
    return "null" if value is None else str(int(value))


def _number(value: Any) -> str:
    return "null" if value is None else str(int(value))


def data_overrides(data: dict[str, Any] | None) -> list[str]:
    """The datamodule overrides that read a listed run's data again (``data_from``). Its
    folder is the one path a job is given: taken from the run's recorded config and checked
    to be under ``train.data_dirs`` (routes_ml), never from the request; sizes are numbers."""
    if not data or data.get("kind") == "mnist":
        source = (data or {}).get("source")
        return [f"datamodule.source={source}"] if source else []
    shape = [
        f"datamodule.image_size={_size(data.get('image_size'))}",
        f"datamodule.channels={_number(data.get('channels'))}",
    ]
    if data["kind"] == "image_folder":
        return ["datamodule=image_folder", f"datamodule.root={_quoted(data['root'])}", *shape]
    return [
        "datamodule=torchvision",
        f"datamodule.name={data['name']}",
        f"datamodule.data_dir={_quoted(data['data_dir'])}",
        # the files the run trained on are there: a job fetches nothing
        "datamodule.download=false",
        *shape,
    ]


def training_overrides(model: str, request: dict[str, Any], run_dir: Path) -> list[str]:
    """The ``train.py`` overrides for a validated request: names and numbers; the one path
    is a listed run's data folder (``data_overrides``)."""
    overrides = [f"model={model}", *data_overrides(request.get("data"))]
    for field, key in REQUEST_TO_OVERRIDE.items():
        value = request.get(field)
        if value is not None:
            overrides.append(f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}")
    overrides += [f"hydra.run.dir={_quoted(str(run_dir))}", PROGRESS_CALLBACK]
    return overrides


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_error_line(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line[len("error: ") :] for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else None


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on ``folder``'s filesystem (its nearest existing parent's); None if unknown."""
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _no_space_left(runs_dir: Path, code: int) -> str | None:
    """Why a training that failed without a word failed, when its runs folder is full: its
    own error could not be written there either (stdout.log and job.json live in it)."""
    free = _free_bytes(runs_dir)
    if free is None or free >= MIN_FREE_BYTES:
        return None
    return (
        f"no space left in {runs_dir} for the run ({free} bytes free; train.py exited with "
        f"status {code}); free some space there and submit the job again"
    )


def _pid_runs(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and still the process we started (its command line names
    ``marker``): a pid from a previous server life may have been reused by another program."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


@dataclass
class _Running:
    job_id: str
    process: subprocess.Popen
    run_dir: Path
    log_handle: Any
    progress_mtime: float = 0.0
    terminate_sent_at: float | None = None


class JobRunner:
    """Starts queued jobs (at most ``max_running`` at once) and tracks them in a thread."""

    def __init__(
        self,
        store: JobStore,
        runs_dir: Path,
        extra_overrides: tuple[str, ...] = (),
        max_running: int = 1,
        poll_interval_s: float = 0.5,
        kill_grace_s: float = 5.0,
        max_queued: int | None = None,
        max_queued_per_owner: int | None = None,
    ) -> None:
        self.store, self.runs_dir = store, runs_dir
        self.max_queued, self.max_queued_per_owner = max_queued, max_queued_per_owner
        self.extra_overrides = list(extra_overrides)
        self.max_running, self.poll_interval_s, self.kill_grace_s = (
            max_running,
            poll_interval_s,
            kill_grace_s,
        )
        self._running: dict[str, _Running] = {}
        self._recovered = False  # jobs a previous server left running are settled
        self._storage_full: str | None = None  # the last "no space" seen, logged once
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._recover()
        except StorageFull as full:  # the loop settles them once there is space again
            self._note_storage_full(full)
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop; jobs still running are killed and recorded as failed."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for running in list(self._running.values()):
            self._kill(running.process, signal.SIGKILL)
            running.process.wait(timeout=30)
            try:
                self._finish(
                    running, error_override="the server shut down while this job was running"
                )
            except StorageFull as full:  # left "running": the next start settles it
                log.warning("job %s not recorded as stopped: %s", running.job_id, full)

    def _recover(self) -> None:
        """Jobs left ``running`` by a previous server life are settled, never left running:
        the run's own ``job.json`` says whether it finished while no server watched (its
        metrics are then kept); otherwise it failed with the server."""
        for job in self.store.with_status(RUNNING):
            if job.pid and _pid_runs(job.pid, job.run_dir):
                self._kill_group(job.pid, signal.SIGKILL)
            values = self._recovered_outcome(job)
            self.store.transition(job.id, (RUNNING,), finished_at=time.time(), **values)
            log.warning(
                "job %s was running when the server stopped; recorded %s", job.id, values["status"]
            )
        self._recovered = True

    @staticmethod
    def _recovered_outcome(job: Job) -> dict[str, Any]:
        record = read_job_record(Path(job.run_dir)) or {}
        if record.get("status") == "ok":
            return {"status": SUCCEEDED, "metrics": record.get("metrics") or {}, "error": None}
        if record.get("status") == "failed" and record.get("error"):
            return {"status": FAILED, "error": str(record["error"])}
        return {"status": FAILED, "error": RESTART_ERROR}

    # requests --------------------------------------------------------------------------------

    def submit(self, model: str, request: dict[str, Any], owner: str = "") -> Job:
        return self.submit_many([(model, request)], owner)[0]

    def submit_many(self, jobs: list[tuple[str, dict[str, Any]]], owner: str = "") -> list[Job]:
        """Queue one job per (model, request), all or none within the queue caps (the
        store raises QueueFull beyond them)."""
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        rows = []
        for model, request in jobs:
            job_id = new_job_id()
            run_dir = self.runs_dir / f"{stamp}_job-{job_id}"
            overrides = training_overrides(model, request, run_dir) + self.extra_overrides
            rows.append((job_id, model, request, overrides, str(run_dir)))
        created = self.store.create_many(rows, owner, self.max_queued, self.max_queued_per_owner)
        self._wake.set()
        return created

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; a running one is signalled and ends as ``cancelled``."""
        job = self.store.get(job_id)
        if job is None or job.status in FINAL_STATUSES:
            return job
        if self.store.transition(
            job_id, (QUEUED,), status=CANCELLED, cancel_requested=1, finished_at=time.time()
        ):
            return self.store.get(job_id)
        self.store.transition(job_id, (RUNNING,), cancel_requested=1)
        self._wake.set()
        return self.store.get(job_id)

    # the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except StorageFull as full:  # retried each tick, succeeds once space is freed
                self._note_storage_full(full)
            except Exception:  # the runner must outlive any one bad job record
                log.exception("job runner tick failed")
            else:
                if self._storage_full is not None:
                    log.info("job runner: space is available again (%s)", self._storage_full)
                    self._storage_full = None
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def _note_storage_full(self, full: StorageFull) -> None:
        """Log a full disk once, not at every tick while it lasts."""
        if str(full) != self._storage_full:
            log.warning("job runner: %s", full)
            self._storage_full = str(full)

    def _tick(self) -> None:
        if not self._recovered:
            self._recover()
        for running in list(self._running.values()):
            self._read_progress(running)
            if running.process.poll() is not None:
                self._finish(running)
            else:
                self._enforce_cancel(running)
        for job in self.store.with_status(QUEUED):
            if len(self._running) >= self.max_running or self._stopping.is_set():
                break
            if job.damage is not None:
                self._fail(job, f"its stored record is damaged ({job.damage}); not started")
            else:
                self._launch(job)

    def _fail(self, job: Job, error: str) -> None:
        """A queued job that cannot start: failed with why (one line), never retried."""
        self.store.transition(
            job.id, (QUEUED,), status=FAILED, error=error, finished_at=time.time()
        )
        log.warning("job %s failed: %s", job.id, error)

    def _open_run_dir(self, job: Job) -> Any | None:
        """The run folder and its output log, ready for the process; None (the job failed
        with why) when they cannot be made."""
        run_dir = Path(job.run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            return (run_dir / OUTPUT_LOG).open("ab")
        except OSError as exc:
            if is_no_space(exc):
                reason = str(StorageFull(run_dir.parent, "the training runs"))
            else:
                reason = f"could not create its run folder {run_dir}: {exc.strerror or exc}"
            self._fail(job, reason)
            return None

    def _launch(self, job: Job) -> None:
        run_dir = Path(job.run_dir)
        log_handle = self._open_run_dir(job)
        if log_handle is None:
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "ML_ENGINE_JOB_ID": job.id}
        env.pop("HYDRA_FULL_ERROR", None)
        env.pop("ML_ENGINE_TRACEBACK", None)
        try:
            process = subprocess.Popen(
                [*TRAIN_COMMAND, *job.overrides],
                cwd=str(PROJECT_ROOT),
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: cancel kills all of it
                preexec_fn=_die_with_server(os.getpid()),
            )
        except OSError as exc:
            log_handle.close()
            self._fail(job, f"could not start training: {exc}")
            return
        started = False
        try:
            started = self.store.transition(
                job.id, (QUEUED,), status=RUNNING, pid=process.pid, started_at=time.time()
            )
        finally:
            # cancelled between the query and here, or not recorded as running (a full jobs
            # database): stopped, so that the queue never holds a job that also runs
            if not started:
                self._kill(process, signal.SIGKILL)
                process.wait()
                log_handle.close()
        if not started:
            return
        self._running[job.id] = _Running(job.id, process, run_dir, log_handle)
        log.info("job %s started (pid %d): %s", job.id, process.pid, " ".join(job.overrides))

    def _read_progress(self, running: _Running) -> None:
        path = running.run_dir / PROGRESS_FILE
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return
        if mtime == running.progress_mtime:
            return
        progress = _read_json(path)
        if progress is None:
            return
        try:
            self.store.update(running.job_id, progress=progress)
        except StorageFull:  # progress is a convenience: read again next tick
            return
        running.progress_mtime = mtime

    def _enforce_cancel(self, running: _Running) -> None:
        job = self.store.get(running.job_id)
        if job is None or not job.cancel_requested:
            return
        now = time.monotonic()
        if running.terminate_sent_at is None:
            self._kill(running.process, signal.SIGTERM)
            running.terminate_sent_at = now
        elif now - running.terminate_sent_at > self.kill_grace_s:
            self._kill(running.process, signal.SIGKILL)

    def _finish(self, running: _Running, error_override: str | None = None) -> None:
        """Record the ended job's outcome; it is tracked until that is written (a full jobs
        database: retried each tick), never left ``running`` with no process."""
        running.log_handle.close()
        self._read_progress(running)
        job = self.store.get(running.job_id)
        if job is not None:
            values = self._outcome(job, running, error_override)
            self.store.transition(job.id, (RUNNING,), finished_at=time.time(), **values)
            log.info("job %s %s", job.id, values["status"])
        self._running.pop(running.job_id, None)

    def _outcome(self, job: Job, running: _Running, error_override: str | None) -> dict[str, Any]:
        if job.cancel_requested:
            return {"status": CANCELLED, "error": None}
        if error_override:
            return {"status": FAILED, "error": error_override}
        record = read_job_record(running.run_dir) or {}
        code = running.process.returncode
        if code == 0 and record.get("status") == "ok":
            return {"status": SUCCEEDED, "metrics": record.get("metrics") or {}, "error": None}
        error = (
            record.get("error")
            or _last_error_line(running.run_dir / OUTPUT_LOG)
            or (f"training was killed by signal {-code}" if code < 0 else None)
            or _no_space_left(running.run_dir.parent, code)
            or f"train.py exited with status {code}"
        )
        return {"status": FAILED, "error": error}

    # signals ---------------------------------------------------------------------------------

    @staticmethod
    def _kill_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def _kill(self, process: subprocess.Popen, sig: signal.Signals) -> None:
        if process.poll() is None:
            self._kill_group(process.pid, sig)
