"""Finding finished training runs and each network's best checkpoint under the runs dir."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ml_engine.errors import UserError
from ml_engine.run.files import JOB_RECORD, read_job_record
from ml_engine.run.helpers import finite_or_none, is_finite_number
from ml_engine.server.model_files import refusal

log = logging.getLogger(__name__)

RUN_CONFIG = Path(".hydra") / "config.yaml"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class RunInfo:
    run: str
    network: str
    checkpoint: str
    val_acc: float | None
    test_acc: float | None
    date: str
    epochs_run: int | None
    data_source: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rank(self) -> tuple[float, float, str]:
        def number(value: float | None) -> float:
            return value if is_finite_number(value) else -1.0

        return (number(self.val_acc), number(self.test_acc), self.date)


class RunIndex:
    """Reads each ``<runs_dir>/*/job.json`` of a successful run (+ the run's composed config for
    the network name); parsed runs are cached by the record's mtime so listing stays cheap as
    runs accumulate."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self._cache: dict[Path, tuple[float, RunInfo | None]] = {}
        self._lock = threading.Lock()

    def _outside(self, run_dir: Path) -> bool:
        """A run directory that is a link to one elsewhere is not a run of this folder (``get``
        refuses it by name as well)."""
        if run_dir.resolve().parent == self.runs_dir.resolve():
            return False
        log.warning("not listing run %s: it leads to %s", run_dir, run_dir.resolve())
        return True

    def _parse(self, run_dir: Path) -> RunInfo | None:
        if self._outside(run_dir):
            return None
        record = read_job_record(run_dir)
        if record is None or record.get("status") != "ok":
            return None  # still running, failed, or not a run of ours
        metrics = record.get("metrics")
        try:
            config = OmegaConf.load(run_dir / RUN_CONFIG)
            network = OmegaConf.select(config, "model.net.name")
            stamp = datetime.fromtimestamp((run_dir / JOB_RECORD).stat().st_mtime, tz=timezone.utc)
        except Exception:  # a half-written or foreign run dir is not a run to offer
            return None
        if not isinstance(metrics, dict):
            return None
        checkpoint = metrics.get("best_ckpt") or metrics.get("last_ckpt")
        if not network or not checkpoint or not Path(checkpoint).is_file():
            return None
        # a checkpoint is unpickled when served: only one that lives in this folder
        why = refusal(Path(checkpoint), self.runs_dir)
        if why is not None:
            log.warning("not listing run %s: its checkpoint %s: %s", run_dir, checkpoint, why)
            return None
        epochs = metrics.get("epochs_run")
        return RunInfo(
            run=run_dir.name,
            network=str(network),
            checkpoint=str(checkpoint),
            val_acc=finite_or_none(metrics.get("val/acc_best", metrics.get("val/acc"))),
            test_acc=finite_or_none(metrics.get("test/acc")),
            date=stamp.isoformat(timespec="seconds"),
            epochs_run=epochs if isinstance(epochs, int) else None,
            data_source=metrics.get("data_source"),
        )

    def runs(self) -> list[RunInfo]:
        if not self.runs_dir.is_dir():
            return []
        found = []
        with self._lock:
            for record_path in self.runs_dir.glob(f"*/{JOB_RECORD}"):
                run_dir = record_path.parent
                try:
                    mtime = record_path.stat().st_mtime
                except OSError:
                    continue
                cached = self._cache.get(run_dir)
                if cached is None or cached[0] != mtime:
                    cached = (mtime, self._parse(run_dir))
                    self._cache[run_dir] = cached
                if cached[1] is not None:
                    found.append(cached[1])
        return found

    def best_by_network(self) -> dict[str, RunInfo]:
        best: dict[str, RunInfo] = {}
        for info in self.runs():
            if info.network not in best or info.rank() > best[info.network].rank():
                best[info.network] = info
        return best

    def get(self, run: str) -> RunInfo:
        """The run named ``run`` (a directory name under the runs dir, never a path)."""
        if not _RUN_NAME.fullmatch(run) or ".." in run:
            raise UserError(
                f"run '{run}' is not a run name; give a run directory name from GET /ml/models"
            )
        run_dir = (self.runs_dir / run).resolve()
        if run_dir.parent != self.runs_dir.resolve():
            raise UserError(f"run '{run}' is not under the runs directory")
        for info in self.runs():
            if info.run == run:
                return info
        raise LookupError(run)
