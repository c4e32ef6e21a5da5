"""The storage of an Optuna study (``hydra.sweeper.storage``), opened safely by concurrent
workers, and the whole study listed beside a sweep's own summary.

Two kinds of storage: an RDB URL (``sqlite:///…``, ``postgresql://…``) or a journal file (any
path without ``://``), Optuna's ``JournalStorage``: an append-only log that works on shared
file systems (NFS) where SQLite's locking does not.

Optuna's RDB storage creates its tables on first use; two sweeps started at once against a new
SQLite file both try, and one fails ("table studies already exists"). The first open is
therefore serialized by a lock file beside the database. Other URLs (PostgreSQL, MySQL) are
opened as they are: their servers serialize schema creation themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError

STUDY_TABLE = "study.md"
_URL_HELP = (
    "expected an RDB URL every worker can reach, e.g. sqlite:///outputs/optuna/mnist.db or "
    "postgresql://user:password@host/db, or a journal file path, e.g. outputs/optuna/mnist.journal"
)


def is_journal(url: str) -> bool:
    """A journal file path (Optuna's JournalStorage) rather than an RDB URL."""
    return "://" not in url


def _open_journal(url: str) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(url)
    if not path.parent.is_dir():
        raise UserError(
            f"hydra.sweeper.storage={url}: the folder {path.parent} does not exist; {_URL_HELP}"
        )
    if path.is_dir():
        raise UserError(f"hydra.sweeper.storage={url} is a folder; {_URL_HELP}")
    # the open-lock (O_EXCL lock file) rather than the default symlink lock: it works on every
    # file system that holds the journal, NFS included
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return JournalStorage(backend)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URL (None for other databases, or in memory)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


@contextlib.contextmanager
def _first_open_lock(url: str) -> Iterator[None]:
    database = sqlite_file(url)
    if database is None:
        yield
        return
    if not database.parent.is_dir():
        raise UserError(
            f"hydra.sweeper.storage={url}: the folder {database.parent} does not exist; {_URL_HELP}"
        )
    with exclusive_lock(database.with_name(database.name + ".lock")):
        yield


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Held by one process at a time, across processes on this host (and file systems that
    honour flock): the lock file ``path`` is created when missing and left in place."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_storage(url: str) -> Any:
    """Optuna's storage for ``url``, its tables created once whoever comes first; a URL that
    cannot be opened is one line naming it and the reason."""
    import optuna

    try:
        if is_journal(url):
            return _open_journal(url)
        with _first_open_lock(url):
            return optuna.storages.RDBStorage(url)
    except UserError:
        raise
    except Exception as error:  # no driver, no server, bad credentials, unreadable journal
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"hydra.sweeper.storage={url}: cannot open the study storage "
            f"({type(error).__name__}: {reason[:200]}); {_URL_HELP}"
        ) from None


# the sweeper class names hparams_search configs give (the second: its name before Optuna 5)
OPTUNA_SWEEPERS = (
    "hydra_plugins.ml_engine_optuna.OptunaSweeper",
    "hydra_plugins.ml_engine_optuna.SharedStudyOptunaSweeper",
)
DEFAULT_JOURNAL = "optuna.journal"


def study_location(config: Any) -> tuple[str, str] | None:
    """(storage URL, study name) of a sweep run by the Optuna sweeper, as the sweeper resolves
    them (``<sweep dir>/optuna.journal`` and the task name by default); None for other sweeps."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") not in OPTUNA_SWEEPERS:
        return None
    storage = sweeper.get("storage") or str(Path(config.hydra.sweep.dir) / DEFAULT_JOURNAL)
    name = sweeper.get("study_name") or str(config.get("task_name", "study"))
    return str(storage), str(name)


def study_rows(url: str, study_name: str) -> list[dict[str, Any]]:
    """Every trial of the study, whichever sweep ran it: number, state, value, params."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    rows = []
    for trial in study.trials:
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                **_values_of(study, trial),
                **{f"params.{k}": v for k, v in sorted(trial.params.items())},
                "started": trial.datetime_start.isoformat(timespec="seconds")
                if trial.datetime_start
                else None,
            }
        )
    return rows


def _values_of(study: Any, trial: Any) -> dict[str, Any]:
    if len(study.directions) == 1:
        return {"value": trial.value}
    values = trial.values or [None] * len(study.directions)
    return {f"value{i}": value for i, value in enumerate(values)}
