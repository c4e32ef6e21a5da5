"""Files a run leaves behind: atomic writes, the job record, the resolved config.

Every writer in the package goes through :func:`atomic_write`, so a reader (a sweep summary,
the server, a resume) sees a whole file or none, and a crash mid-write leaves only a temp file
whose name says what it is (``.<name>.<pid>.partial``) and which the next write cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept out of import time: model-work child processes write files too
    from omegaconf import DictConfig

JOB_RECORD = "job.json"
RESOLVED_CONFIG = "config_resolved.yaml"
PARTIAL_SUFFIX = ".partial"
# config keys (at any depth) whose values are secrets: a run dir is shared, copied and
# archived, so its config copies hold REDACTED instead of a set value
SECRET_KEYS = frozenset({"api_key"})
REDACTED = "***"
# A crash between writing and renaming leaves ".<name>.<pid>.partial" beside the target.
_PARTIAL_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial$")


def partial_path(target: Path, pid: int | None = None) -> Path:
    """The temp name :func:`atomic_write` uses for ``target`` in process ``pid`` (this one)."""
    return target.with_name(f".{target.name}.{pid or os.getpid()}{PARTIAL_SUFFIX}")


def remove_partials_of(directory: Path, pid: int) -> list[Path]:
    """Delete what a (crashed) process ``pid`` left half-written anywhere under ``directory``."""
    removed = []
    if directory.is_dir():
        for path in directory.rglob(f".*.{pid}{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_partials(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temp files in ``folder`` left by writers that died (their pid is gone)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _PARTIAL_NAME.match(entry.name)
        if not match or (name is not None and match["name"] != name):
            continue
        if int(match["pid"]) != os.getpid() and _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def clean_stale_partials_under(root: Path) -> list[Path]:
    """:func:`clean_stale_partials` in ``root`` and every folder below it: what writers killed
    mid-write left anywhere there (a quantization's GGUF, a checkpoint)."""
    if not root.is_dir():
        return []
    folders = {path.parent for path in root.rglob(f".*{PARTIAL_SUFFIX}")}
    return [path for folder in sorted(folders) for path in clean_stale_partials(folder)]


def check_output_file(target: Path, key: str = "output") -> None:
    """Refuse an output path that is not a regular file or a new name: renaming the finished
    file over it would replace a directory's name, a FIFO or a symlink (not its target)."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISLNK: "a symlink", stat.S_ISFIFO: "a FIFO"}
    kinds |= {stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
    kind = next((name for test, name in kinds.items() if test(mode)), None)
    if kind is not None:
        from ml_engine.errors import UserError

        raise UserError(f"{key}={target} is {kind}; give the path of a regular file to write")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temp path beside ``target`` for writers that need a file name (checkpoints, GGUF,
    quantizer output); renamed over ``target`` when the block ends without an error, removed
    otherwise. The caller's writer must have closed the file by then."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(target.parent, target.name)
    tmp = partial_path(target)
    try:
        yield tmp
        if tmp.exists():
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    target: Path, write: Callable[[IO[Any]], object], *, binary: bool = False, newline: str = ""
) -> Path:
    """Write ``target`` whole or not at all: ``write(handle)`` fills a temp file in the same
    folder, which is flushed, fsynced and renamed over ``target``."""
    with atomic_path(Path(target)) as tmp:
        mode = "wb" if binary else "w"
        kwargs: dict[str, Any] = {} if binary else {"encoding": "utf-8", "newline": newline}
        with open(tmp, mode, **kwargs) as handle:
            write(handle)
            handle.flush()
    return Path(target)


def write_text_atomic(target: Path, text: str) -> Path:
    return atomic_write(target, lambda handle: handle.write(text))


def write_json_atomic(target: Path, payload: Mapping[str, Any]) -> Path:
    """JSON through :func:`atomic_write`, so readers never see half a file."""
    return write_text_atomic(target, json.dumps(payload, indent=2, default=str) + "\n")


def save_resolved_config(cfg: DictConfig, output_dir: Path) -> Path:
    """`.hydra/config.yaml` keeps interpolations; this is the config with every value filled in
    but secrets (:data:`SECRET_KEYS`), which are written as :data:`REDACTED`."""
    from omegaconf import OmegaConf

    plain = redact_secrets(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return write_text_atomic(output_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(plain))


def redact_secrets(node: Any) -> Any:
    """A copy of a plain config with the set values of :data:`SECRET_KEYS` replaced by
    :data:`REDACTED` (null stays null: it says no secret was set)."""
    if isinstance(node, dict):
        return {
            key: REDACTED if key in SECRET_KEYS and value is not None else redact_secrets(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [redact_secrets(value) for value in node]
    return node


def redact_override(override: str) -> str:
    """A command-line override with a secret's value replaced (``api_key=s3cret`` →
    ``api_key=***``), as job records and summaries show the overrides."""
    key, equals, _ = override.partition("=")
    name = key.lstrip("+~").rsplit(".", 1)[-1].strip()
    return f"{key}={REDACTED}" if equals and name in SECRET_KEYS else override


def read_job_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``job.json``; None when it is missing or not JSON (a run still starting)."""
    try:
        record = json.loads((Path(run_dir) / JOB_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
