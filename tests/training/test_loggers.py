"""logger=mlflow and logger=wandb: short real trainings, read back through each tool's own
formats, offline; and the one-line error when a logger's package is missing."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_engine.training.train import train
from tests.conftest import CLI_TEST_OVERRIDES, run_entrypoint

SHORT_TRAINING = [
    "model=mlp_mnist",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "trainer.log_every_n_steps=5",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections from this process may only reach loopback or local sockets."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise AssertionError(f"a logger tried the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.mark.slow
def test_mlflow_run_has_params_metric_history_and_the_checkpoint(make_cfg, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = make_cfg("train", ["logger=mlflow", *SHORT_TRAINING], keep_loggers=True)
    metrics = train(cfg)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["net/name"] == "mlp_mnist"  # the model's own hyperparameters
    assert run.data.params["data_source"] == "bundled"
    assert run.data.tags["run_dir"] == str(tmp_path)

    val_acc = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(val_acc) == 2  # one point per epoch
    assert val_acc[-1].value == pytest.approx(metrics["val/acc"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) >= 2
    assert run.data.metrics["hp/test/acc"] == pytest.approx(metrics["test/acc"])

    artifacts = {a.path: a for a in client.list_artifacts(run.info.run_id, "best")}
    best = Path(metrics["best_ckpt"])
    assert artifacts["best/best.ckpt"].file_size == best.stat().st_size
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(tmp_path)


@pytest.mark.slow
def test_wandb_offline_run_holds_history_and_summary(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg("train", ["logger=wandb", *SHORT_TRAINING], keep_loggers=True)
    assert cfg.logger.wandb.offline is True  # offline is the config's default, not only the env's
    metrics = train(cfg)

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary, config = _read_wandb_run(run_file)
    assert [row["val/acc"] for row in history if "val/acc" in row][-1] == pytest.approx(
        metrics["val/acc"]
    )
    assert len([row for row in history if "val/acc" in row]) == 2  # one per epoch
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"])
    assert summary["hp/val/acc_best"] == pytest.approx(metrics["val/acc_best"])
    assert json.loads(config["net"])["name"] == "mlp_mnist"
    assert json.loads(config["data_source"]) == "bundled"
    assert "exit" in _record_kinds(run_file)  # the run was finished, not left open


_BLOCK, _HEADER = 32768, 7  # the .wandb file is a LevelDB-style log of Record protos
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        room = _BLOCK - position % _BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if room < _HEADER or (length == 0 and kind == 0):
            position += room  # block padding
            continue
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items: Any) -> dict[str, str]:
    return {item.key or "/".join(item.nested_key): item.value_json for item in items}


def _read_wandb_run(path: Path) -> tuple[list[dict], dict[str, Any], dict[str, str]]:
    history, summary, config = [], {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({k: json.loads(v) for k, v in _items(record.history.item).items()})
        elif kind == "summary":
            summary.update({k: json.loads(v) for k, v in _items(record.summary.update).items()})
        elif kind == "config":
            config.update(_items(record.config.update))
    return history, summary, config


def _record_kinds(path: Path) -> set[str]:
    return {record.WhichOneof("record_type") for record in _wandb_records(path)}


@pytest.mark.slow
@pytest.mark.parametrize("logger, package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_logger_package_is_one_line_naming_the_extra(
    logger: str, package: str, tmp_path: Path
) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    # the interpreter imports sitecustomize at start: the package then cannot be found
    (hide / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
    pythonpath = os.pathsep.join(p for p in (str(hide), os.environ.get("PYTHONPATH")) if p)
    done = run_entrypoint(
        "train.py",
        f"logger={logger}",
        *CLI_TEST_OVERRIDES,
        f"paths.log_dir={tmp_path / 'out'}",
        env={"PYTHONPATH": pythonpath},
        timeout=300,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: logger '{logger}' needs the {package} package, which is not installed; "
        'install it with: pip install -e ".[loggers]"'
    ], done.stderr
    assert not list(tmp_path.rglob("checkpoints"))  # stopped before any training
