"""TensorBoard curves as the TensorBoard server serves them, after a real training and a
generation run: every point of every curve, and the HParams tab with the run's final metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from omegaconf import open_dict

from ml_engine.llm.generate import generate
from ml_engine.training.train import train
from tests.conftest import compose_config, shrink
from tests.llm.conftest import FAST_OVERRIDES


class TensorBoardServer:
    """A ``tensorboard --logdir`` process on loopback, read through its HTTP data API."""

    def __init__(self, port: int, log: Path) -> None:
        self.base, self.log = f"http://127.0.0.1:{port}", log

    def get(self, path: str, **query: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def scalars(self, run: str, tag: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one curve, as the Scalars dashboard plots them."""
        points = self.get("/data/plugin/scalars/scalars", run=run, tag=tag)
        return [(step, value) for _wall_time, step, value in points]

    def hparams_metrics(self) -> dict[str, float]:
        """The HParams tab's metric values of the (single) session: tag → value."""
        request = {
            "experimentName": "",
            "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN", "STATUS_RUNNING"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100,
        }
        groups = self.get("/data/plugin/hparams/session_groups", request=json.dumps(request))[
            "sessionGroups"
        ]
        assert len(groups) == 1, groups
        return {m["name"]["tag"]: m["value"] for m in groups[0]["metricValues"]}

    def wait_until_loaded(self, run: str, tag: str, deadline_s: float = 60) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                if tag in self.get("/data/plugin/scalars/tags").get(run, {}):
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.3)
        raise AssertionError(
            f"tensorboard did not serve {run}/{tag} within {deadline_s} s:\n"
            + self.log.read_text()[-3000:]
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def tensorboard_server(logdir: Path) -> Iterator[TensorBoardServer]:
    port, log = _free_port(), logdir / "tensorboard_server.log"
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        f"--logdir={logdir}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--reload_interval=1",
    ]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            yield TensorBoardServer(port, log)
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_training_curves_keep_every_point_and_hparams_carry_final_metrics(make_cfg, tmp_path):
    cfg = make_cfg(
        "train",
        [
            "model=mlp_mnist",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=20",
            "trainer.log_every_n_steps=5",
        ],
        keep_loggers=True,
    )
    metrics = train(cfg)

    with tensorboard_server(tmp_path) as server:
        server.wait_until_loaded("tensorboard", "val/acc")
        for tag in ("val/acc", "val/loss", "train/loss", "train/acc"):
            curve = server.scalars("tensorboard", tag)
            assert len(curve) == 2, (tag, curve)  # one point per epoch
            assert curve[0][0] < curve[1][0], (tag, curve)
        loss_steps = server.scalars("tensorboard", "train/loss_step")
        assert len(loss_steps) == 8, loss_steps  # every 5 of 40 steps
        assert [step for step, _ in loss_steps] == sorted({step for step, _ in loss_steps})

        val_acc = server.scalars("tensorboard", "val/acc")
        assert val_acc[-1][1] == pytest.approx(metrics["val/acc"])
        final = server.hparams_metrics()
        served_train_acc = [value for _, value in server.scalars("tensorboard", "train/acc")]

    # the server's UI charts a CLI run from the same event files, as TensorBoard served them
    from ml_engine.server.charts import read_curves

    charted = read_curves(tmp_path)
    assert charted["source"] == "tensorboard"
    assert charted["step"]["x"] == [step for step, _ in loss_steps]
    assert charted["step"]["series"]["train/loss_step"] == pytest.approx([v for _, v in loss_steps])
    assert charted["epoch"]["x"] == [1, 2]
    assert charted["epoch"]["series"]["val/acc"] == pytest.approx([v for _, v in val_acc])
    assert charted["epoch"]["series"]["train/acc"] == pytest.approx(served_train_acc)
    assert not any(name.startswith(("test/", "hp/")) for name in charted["epoch"]["series"])
    assert final["hp/test/acc"] == pytest.approx(metrics["test/acc"])
    assert final["hp/val/acc_best"] == pytest.approx(metrics["val/acc_best"])
    assert final["hp/val/acc_best"] == pytest.approx(max(value for _, value in val_acc))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    plugin = events.PluginTagToContent("hparams")
    start = plugin["_hparams_/session_start_info"].decode("latin-1")
    assert "mlp_mnist" in start and "bundled" in start  # network and data source recorded


def test_generation_curve_keeps_every_repetition(tmp_path: Path) -> None:
    cfg = shrink(
        compose_config("generate", [*FAST_OVERRIDES, "logger=tensorboard", "llm/backend=mock"]),
        tmp_path / "run",
        keep_loggers=True,
    )
    with open_dict(cfg):
        cfg.paths.models_dir = str(tmp_path / "models")  # the mock backend opens no model
    metrics = generate(cfg)

    with tensorboard_server(tmp_path / "run") as server:
        server.wait_until_loaded("tensorboard", "gen/tokens_per_s")
        curve = server.scalars("tensorboard", "gen/tokens_per_s")
        final = server.hparams_metrics()
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    reps = [r for p in result["bench"]["prompts"] for r in p["repetitions"]]
    assert len(reps) == 4  # two prompts, two repetitions each
    assert [step for step, _ in curve] == list(range(len(reps)))
    assert [value for _, value in curve] == pytest.approx([r["gen_tokens_per_s"] for r in reps])
    assert final["hp/gen/tokens_per_s"] == pytest.approx(metrics["gen/tokens_per_s"])
