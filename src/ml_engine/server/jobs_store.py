"""Training job records in SQLite (stdlib ``sqlite3``), so they survive a server restart."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ml_engine.errors import UserError
from ml_engine.server.errors import StorageFull, is_no_space

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
# the one list of job statuses: the API's schema and its ?status= check derive from it, the
# UI reads each job's ``final``
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    overrides TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pid INTEGER,
    progress TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""

_JSON_COLUMNS = ("request", "overrides", "progress", "metrics")
# what each column must hold for a row to be read as a job; a damaged row (bytes flipped
# inside it pass PRAGMA quick_check) is named, never allowed to fail a query of many rows
_JSON_SHAPES: dict[str, type[dict] | type[list]] = {
    "request": dict,
    "overrides": list,
    "progress": dict,
    "metrics": dict,
}
_NUMBER, _TEXT, _INT = (int, float), (str,), (int,)
_COLUMN_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {  # column → (types, nullable)
    "id": (_TEXT, False),
    "seq": (_INT, False),
    "model": (_TEXT, False),
    "run_dir": (_TEXT, False),
    "created_at": (_NUMBER, False),
    "started_at": (_NUMBER, True),
    "finished_at": (_NUMBER, True),
    "pid": (_INT, True),
    "error": (_TEXT, True),
    "cancel_requested": (_INT, False),
    "owner": (_TEXT, False),
}
# what a damaged column reads as, so that a damaged job still settles (recovery, cancel)
_DEFAULTS: dict[str, Any] = {
    "request": {},
    "overrides": [],
    "progress": {},
    "metrics": {},
    "seq": 0,
    "created_at": 0.0,
    "cancel_requested": 0,
}
# columns added after the first release, with their definitions: added to older databases
_ADDED_COLUMNS = {"owner": "TEXT NOT NULL DEFAULT ''"}


@dataclass
class Job:
    id: str
    seq: int
    model: str
    status: str
    request: dict[str, Any]
    overrides: list[str]
    run_dir: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    owner: str = ""
    # what is wrong with the stored row, or None: a damaged job is reported, never served
    damage: str | None = None


class QueueFull(Exception):
    """More queued jobs than a cap allows: ``scope`` is "server" or "owner"."""

    def __init__(self, scope: str, queued: int, limit: int) -> None:
        super().__init__(f"{queued} jobs queued ({scope}); allowed: {limit}")
        self.scope, self.queued, self.limit = scope, queued, limit


def _lock_owner(path: Path) -> str:
    """The pid holding a flock on ``path``'s inode, from /proc/locks (Linux); "?" elsewhere."""
    info = path.stat()
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "?"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            return fields[4]
    return "?"


def _claim(path: Path) -> IO[bytes]:
    """One server per jobs database: a second one would fail the first one's running jobs as
    leftovers of a crash (and kill their processes), or launch its queued jobs again.

    The lock is taken on the database file itself (flock: its inode), so a second path to the
    same file (a hard link, a bind mount, another spelling) finds it taken. SQLite's own locks
    are POSIX locks, which flock does not touch; this handle stays open until the connection
    has closed (closing any handle of a file drops a process's POSIX locks on it)."""
    handle = open(path, "ab")  # noqa: SIM115 (held open for the server's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _lock_owner(path)
        handle.close()
        raise UserError(
            f"jobs database {path} is in use by another server (pid {owner}); "
            "stop it or give this one another with jobs_db=<path>"
        ) from None
    return handle


def _damage(path: Path, was_empty: bool) -> str | None:
    """Why the database at ``path`` cannot be used as it is; None when it is sound."""
    if was_empty:
        return "is empty (0 bytes): its records are lost"
    try:
        with contextlib.closing(sqlite3.connect(str(path))) as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return f"is damaged ({exc})"
    problems = [str(row[0]) for row in rows if row[0] != "ok"]
    return f"is damaged ({problems[0]})" if problems else None


def _move_aside(path: Path) -> Path:
    """``jobs.sqlite`` → ``jobs.sqlite.corrupt-<UTC time>``, its WAL and shared-memory files
    with it (a stale WAL must not meet the fresh database)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{target}{suffix}")
    return target


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def _decode_text(data: bytes) -> str:
    """SQLite TEXT → str; bytes that are not UTF-8 (a damaged row) keep their bad bytes as
    surrogate escapes, so reading them cannot fail the query (sqlite3's own decoding raises)."""
    return data.decode("utf-8", errors="surrogateescape")


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _column_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be column ``name`` of a job; None when it can."""
    if isinstance(value, str) and not _is_utf8(value):
        return f"{name} is not valid UTF-8"
    if name in _JSON_SHAPES:
        try:
            parsed = json.loads(value) if isinstance(value, str) else None
        except ValueError as exc:
            return f"{name} is not valid JSON ({exc})"
        shape = _JSON_SHAPES[name]
        kind = "object" if shape is dict else "array"
        return None if isinstance(parsed, shape) else f"{name} is not a JSON {kind}"
    if name == "status":
        return None if value in JOB_STATUSES else f"status {str(value)[:32]!r} is not a job status"
    types, nullable = _COLUMN_TYPES.get(name, ((object,), True))
    if (value is None and nullable) or (isinstance(value, types) and not isinstance(value, bool)):
        return None
    return f"{name} holds {type(value).__name__}, not {types[0].__name__}"


def _to_job(row: sqlite3.Row) -> Job:
    """The row as a job; a damaged column reads as its default and is named in ``damage``."""
    values, problems = dict(row), []
    for name, value in list(values.items()):
        problem = _column_problem(name, value)
        if problem is not None:
            problems.append(problem)
            if name in _DEFAULTS:
                values[name] = _DEFAULTS[name]
        elif name in _JSON_SHAPES:
            values[name] = json.loads(value)
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values, damage="; ".join(problems) or None)


# a job's row by its id: bound as bytes, so an id whose stored bytes are not UTF-8 (read back
# with surrogate escapes, _decode_text) still finds its row, to be failed or cancelled
_BY_ID = "id = CAST(? AS TEXT)"


def _id_param(job_id: str) -> bytes:
    try:
        return job_id.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate a client sent: it matches no row
        return job_id.encode("utf-8", errors="surrogatepass")


def _having_status(jobs: list[Job], status: str | None) -> list[Job]:
    """The jobs whose row holds ``status``: a query by status reads the index, which a
    damaged page may contradict; the row decides, as in the unfiltered list."""
    return jobs if status is None else [job for job in jobs if job.status == status]


def _raise_if_full(exc: sqlite3.Error, path: Path) -> None:
    """SQLite's "database or disk is full" as the error that names the folder (a 507)."""
    if is_no_space(exc):
        raise StorageFull(path.parent, "the jobs database") from exc


class JobStore:
    """Thread-safe access to the jobs table; every write is its own transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        was_empty = path.exists() and path.stat().st_size == 0
        self._owner = _claim(path)
        damage = _damage(path, was_empty)
        if damage is not None:
            # the jobs list is a convenience (each run keeps its own job.json): keep the bad
            # file for inspection and serve on with a fresh one, rather than refuse to start
            # or answer 500 on every request
            moved = _move_aside(path)
            self._owner.close()
            self._owner = _claim(path)
            log.warning(
                "jobs database %s %s; moved it to %s and started an empty one",
                path,
                damage,
                moved.name,
            )
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.text_factory = _decode_text
        try:
            self._prepare()
        except sqlite3.Error as exc:
            self.close()
            _raise_if_full(exc, path)
            raise

    def _prepare(self) -> None:
        # WAL: readers (GET /ml/jobs) never wait on the runner's progress writes
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the status and id indexes from the table: a byte flipped in a row's status
        leaves the index (a copy) disagreeing, so ``?status=`` lists would miss or misfile
        the job; quick_check does not compare them. A few milliseconds per thousand jobs."""
        try:
            self._db.execute("REINDEX jobs")
        except sqlite3.Error as exc:  # damaged ids that now collide, or a full disk: the
            # listings still agree (the row decides, _having_status)
            log.warning("jobs database %s: could not rebuild its indexes (%s)", self.path, exc)

    def _add_missing_columns(self) -> None:
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                finally:
                    # SQLite has already rolled back a transaction that ran out of space
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                _raise_if_full(exc, self.path)
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()  # releases the claim, after SQLite's own locks are gone

    def create(
        self, job_id: str, model: str, request: dict[str, Any], overrides: list[str], run_dir: str
    ) -> Job:
        return self.create_many([(job_id, model, request, overrides, run_dir)])[0]

    def create_many(
        self,
        jobs: list[tuple[str, str, dict[str, Any], list[str], str]],
        owner: str = "",
        max_queued: int | None = None,
        max_queued_per_owner: int | None = None,
    ) -> list[Job]:
        """Queue ``jobs`` (id, model, request, overrides, run dir) all or none; counted and
        inserted in one transaction, so concurrent requests cannot overshoot the caps."""
        with self._transaction() as db:
            count = "SELECT COUNT(*) FROM jobs WHERE status = ?"
            queued = db.execute(count, (QUEUED,)).fetchone()[0]
            if max_queued is not None and queued + len(jobs) > max_queued:
                raise QueueFull("server", queued, max_queued)
            mine = db.execute(count + " AND owner = ?", (QUEUED, owner)).fetchone()[0]
            if max_queued_per_owner is not None and mine + len(jobs) > max_queued_per_owner:
                raise QueueFull("owner", mine, max_queued_per_owner)
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
            for offset, (job_id, model, request, overrides, run_dir) in enumerate(jobs, 1):
                db.execute(
                    "INSERT INTO jobs (id, seq, model, status, request, overrides, run_dir,"
                    " created_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        seq + offset,
                        model,
                        QUEUED,
                        json.dumps(request),
                        json.dumps(overrides),
                        run_dir,
                        time.time(),
                        owner,
                    ),
                )
        return [job for job_id, *_ in jobs if (job := self.get(job_id)) is not None]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            query = f"SELECT * FROM jobs WHERE {_BY_ID}"
            row = self._db.execute(query, (_id_param(job_id),)).fetchone()
        return _to_job(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first, damaged rows included (their ``damage`` says what is wrong)."""
        query, params = "SELECT * FROM jobs", []
        if status:
            query, params = query + " WHERE status = ?", [status]
        with self._lock:
            rows = self._db.execute(
                query + " ORDER BY seq DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return _having_status([_to_job(row) for row in rows], status)

    def count(self, status: str) -> int:
        """Jobs in ``status`` now (read at each /metrics scrape)."""
        with self._lock:
            query = "SELECT COUNT(*) FROM jobs WHERE status = ?"
            return int(self._db.execute(query, (status,)).fetchone()[0])

    def with_status(self, status: str) -> list[Job]:
        """Jobs in ``status``, oldest first (the queue order)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,)
            ).fetchall()
        return _having_status([_to_job(row) for row in rows], status)

    def update(self, job_id: str, **values: Any) -> None:
        if not values:
            return
        columns = ", ".join(f"{name} = ?" for name in values)
        params = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()]
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE {_BY_ID}", (*params, _id_param(job_id)))

    def transition(self, job_id: str, from_statuses: tuple[str, ...], **values: Any) -> bool:
        """Update only if the job is still in one of ``from_statuses`` (no lost races)."""
        columns = ", ".join(f"{name} = ?" for name in values)
        params = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()]
        marks = ", ".join("?" for _ in from_statuses)
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE jobs SET {columns} WHERE {_BY_ID} AND status IN ({marks})",
                (*params, _id_param(job_id), *from_statuses),
            )
        return cursor.rowcount == 1
