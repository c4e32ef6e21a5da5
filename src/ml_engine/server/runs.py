"""Finding finished training runs, what each trained (architecture, data) and each network's
best checkpoint under the runs dir; whether and how the server can train a run's data again."""

from __future__ import annotations

import functools
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
from ml_engine.run.locations import CONFIG_DIR
from ml_engine.server.model_files import refusal
from ml_engine.training.choices import SOURCES
from ml_engine.training.registry import current_path

log = logging.getLogger(__name__)

RUN_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_CONFIG = Path(".hydra") / "hydra.yaml"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# a torchvision dataset or architecture name, as it may sit on a training command line
_PLAIN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
# the datamodule classes the server trains classifiers on, by the kind a run's data is shown as
DATAMODULES = {
    "ml_engine.training.vision.mnist.MNISTDataModule": "mnist",
    "ml_engine.training.vision.image_datamodules.ImageFolderDataModule": "image_folder",
    "ml_engine.training.vision.image_datamodules.TorchvisionDataModule": "torchvision",
}


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
    # what trained: torchvision's architecture for the network "torchvision", else the network
    architecture: str = ""
    # the data it trained on: kind (mnist, image_folder, torchvision, or the datamodule's class
    # name), label (one line for people) and the settings a new training needs to read it again
    data: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rank(self) -> tuple[float, float, str]:
        def number(value: float | None) -> float:
            return value if is_finite_number(value) else -1.0

        return (number(self.val_acc), number(self.test_acc), self.date)


def _in_run_dir(run_dir: Path, recorded: Any) -> str | None:
    """The recorded checkpoint as it lies in this run dir: a record keeps the absolute path the
    run was written at, and a runs folder moved or copied elsewhere must serve its own files,
    never the ones it was copied from."""
    if not recorded:
        return None
    path = Path(str(recorded))
    local = run_dir / path.parent.name / path.name
    if path.parent.name == "checkpoints" and local.is_file():
        return str(local)
    return str(path)


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
            arch = OmegaConf.select(config, "model.net.arch", default=None)
            datamodule = _datamodule(config)
            stamp = datetime.fromtimestamp((run_dir / JOB_RECORD).stat().st_mtime, tz=timezone.utc)
        except Exception:  # a half-written or foreign run dir is not a run to offer
            return None
        if not isinstance(metrics, dict):
            return None
        checkpoint = _in_run_dir(run_dir, metrics.get("best_ckpt") or metrics.get("last_ckpt"))
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
            architecture=str(arch) if network == "torchvision" and arch else str(network),
            data=run_data(datamodule, metrics.get("data_source"), _run_cwd(run_dir)),
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

    def newest_first(self) -> list[RunInfo]:
        return sorted(self.runs(), key=lambda info: (info.date, info.run), reverse=True)

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


# ---- what a run trained on, and training on it again ---------------------------------------


def _datamodule(config: Any) -> dict[str, Any]:
    """The run's datamodule node, its interpolations (``data_dir: ${paths.data_dir}``)
    resolved where the recorded config allows it."""
    node = config.get("datamodule")
    if not OmegaConf.is_dict(node):  # a run written by other means: no data to show
        return {}
    values = OmegaConf.to_container(node, resolve=False)
    for key in values:
        try:
            values[key] = OmegaConf.to_container(OmegaConf.create({"v": node[key]}))["v"]
        except Exception:  # one that needs Hydra's runtime: the value as recorded
            continue
    return values


def _run_cwd(run_dir: Path) -> Path | None:
    """The folder ``train.py`` ran in: a relative ``datamodule.root`` is relative to it."""
    try:
        cwd = OmegaConf.select(OmegaConf.load(run_dir / HYDRA_CONFIG), "hydra.runtime.cwd")
    except Exception:  # no hydra.yaml (a run written by other means): paths stay as recorded
        return None
    return Path(cwd) if isinstance(cwd, str) and cwd else None


def _folder(value: Any, cwd: Path | None) -> str | None:
    if not isinstance(value, str) or not value or "${" in value:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or cwd is None else cwd / path)


def _size(value: Any) -> int | list[int] | None:
    """An image size as a command line may carry it: a positive int, [height, width], or None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, list) and len(value) == 2 and all(_size(v) is not None for v in value):
        return [int(v) for v in value]
    return None


def _shape(size: Any, channels: Any) -> str:
    parts = []
    if isinstance(size, int):
        parts.append(f"{size}×{size}")
    elif isinstance(size, list):
        parts.append("×".join(str(v) for v in size))
    if channels in (1, 3):
        parts.append("grayscale" if channels == 1 else "RGB")
    return f" ({', '.join(parts)})" if parts else ""


def run_data(node: dict[str, Any], data_source: Any, cwd: Path | None) -> dict[str, Any]:
    """The run's data as the listing shows it and a new training reads it again."""
    # a run from before the datamodules moved names them by their old path
    target = current_path(str(node.get("_target_", "")))
    kind = DATAMODULES.get(target)
    channels = node.get("channels") if node.get("channels") in (1, 3) else None
    size = _size(node.get("image_size"))
    if kind == "mnist":
        source = data_source if data_source in SOURCES else node.get("source")
        source = source if source in SOURCES else None
        return {
            "kind": kind,
            "label": f"MNIST digits ({source or 'unknown source'})",
            "source": source,
        }
    if kind == "image_folder":
        root = _folder(node.get("root"), cwd)
        return {
            "kind": kind,
            "label": f"image folder {root}{_shape(size, channels)}",
            "root": root,
            "image_size": size,
            "channels": channels,
        }
    if kind == "torchvision":
        name = node.get("name") if _PLAIN_NAME.fullmatch(str(node.get("name"))) else None
        data_dir = _folder(node.get("data_dir"), cwd)
        return {
            "kind": kind,
            "label": f"torchvision {name} in {data_dir}{_shape(size, channels)}",
            "name": name,
            "data_dir": data_dir,
            "image_size": size,
            "channels": channels,
        }
    name = target.rpartition(".")[2] or "unknown"
    return {"kind": name, "label": f"{name} (not a datamodule the server trains on)"}


@functools.cache
def model_configs() -> tuple[str, ...]:
    """``conf/model`` presets of image classifiers (resnet18, ...): what ``model=`` names."""
    names = []
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        try:
            defaults = OmegaConf.load(path).get("defaults") or []
        except Exception:  # an unreadable preset is not one to offer
            continue
        nets = [d.get("net") for d in defaults if isinstance(d, dict) or OmegaConf.is_dict(d)]
        if nets and nets[0] in ("cnn_mnist", "mlp_mnist", "torchvision"):
            names.append(path.stem)
    return tuple(names)


def _under(folder: Path, roots: tuple[Path, ...]) -> bool:
    resolved = folder.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def data_refusal(data: dict[str, Any], data_dirs: tuple[Path, ...]) -> str | None:
    """Why the server cannot train on this data again; None when it can."""
    kind = data.get("kind")
    if kind == "mnist":
        return None if data.get("source") else "its MNIST source is not recorded"
    if kind not in ("image_folder", "torchvision"):
        return f"it trained on {kind}, which the server does not train classifiers on"
    folder = data.get("root") if kind == "image_folder" else data.get("data_dir")
    if kind == "torchvision" and not data.get("name"):
        return "its torchvision dataset name is not recorded"
    if not folder:
        return "its data folder is not recorded"
    allowed = ", ".join(str(d) for d in data_dirs) or "none configured"
    if not _under(Path(folder), data_dirs):
        return (
            f"its data folder {folder} is outside the folders this server trains from "
            f"(train.data_dirs: {allowed})"
        )
    if not Path(folder).is_dir():
        return f"its data folder {folder} no longer exists"
    return None


def training_refusal(info: RunInfo, models: list[str], data_dirs: tuple[Path, ...]) -> str | None:
    """Why the server cannot train ``info``'s architecture on its data again (one line, for
    the listing and a 422); None when ``POST /ml/train`` with ``data_from`` would."""
    if info.architecture not in models:
        return (
            f"the server does not train {info.architecture} (it trains: {', '.join(models)}); "
            "train it with python train.py"
        )
    why = data_refusal(info.data or {}, data_dirs)
    return None if why is None else f"the server cannot train on this run's data: {why}"
