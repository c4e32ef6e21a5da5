"""Issue 24, points 8 and 9: every run is listed with its real architecture and data, a run's
data trains again from the API (or the listing says why the server cannot), a run trained with
``python train.py`` has its curves one click away, and a one-cycle run logs its learning rate
per step (read back from what the TensorBoard logger wrote)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ml_engine.run.files import read_job_record
from ml_engine.server import create_app
from tests.conftest import run_entrypoint
from tests.server.conftest import (
    CHROMEDRIVER,
    CHROMIUM,
    JOB_OVERRIDES,
    live_server,
    serve_config,
    wait_for_job,
)
from tests.server.test_browser import CHART_DRAWN, POINTS, _text, _wait  # as test_browser drives it
from tests.training.vision.test_image_classification import write_digit_folder

FOLDER_RUN, TB_RUN = "2025-01-03_00-00-00_folder", "2025-01-03_00-00-01_tensorboard"
# what the test servers' jobs and the runs below train with, minus the MNIST-only source
QUIET = [o for o in JOB_OVERRIDES if not o.startswith("datamodule.")]
TB_EPOCHS, TB_STEPS, LOG_EVERY = 2, 50, 5  # 25 batches an epoch (JOB_OVERRIDES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, bundled_digits) -> dict[str, Path]:
    """Two runs as a user makes them with ``python train.py``: resnet18 on an RGB image folder
    under ``<base>/data``, and cnn_mnist (one-cycle) logged by the default TensorBoard logger."""
    base = tmp_path_factory.mktemp("runs_ui")
    root = write_digit_folder(base / "data" / "tinted", bundled_digits, per_class=10, rgb=True)
    runs = base / "runs"
    folder = run_entrypoint(
        "train.py",
        "model=resnet18",
        "datamodule=image_folder",
        f"datamodule.root={root}",
        "datamodule.image_size=16",
        "datamodule.batch_size=16",
        "trainer.max_epochs=1",
        "callbacks.early_stopping=null",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={runs / FOLDER_RUN}",
        *QUIET,
    )
    assert folder.returncode == 0, folder.stderr[-3000:]
    logged = run_entrypoint(
        "train.py",
        "model=cnn_mnist",
        f"trainer.max_epochs={TB_EPOCHS}",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "trainer.accelerator=cpu",
        "seed=1",
        f"hydra.run.dir={runs / TB_RUN}",
        *[o for o in JOB_OVERRIDES if o != "logger=none"],  # the default logger: tensorboard
    )
    assert logged.returncode == 0, logged.stderr[-3000:]
    return {"runs": runs, "root": root, "data": base / "data"}


def _by_run(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in listing["runs"]}


@pytest.mark.slow
def test_runs_name_their_architecture_and_data(make_client, trained, tmp_path: Path) -> None:
    client = make_client(runs_dir=trained["runs"], **{"train.data_dirs": [str(trained["data"])]})
    runs = _by_run(client.get("/ml/runs").json())
    folder, logged = runs[FOLDER_RUN], runs[TB_RUN]
    assert (folder["network"], folder["architecture"]) == ("torchvision", "resnet18")
    assert folder["data"]["kind"] == "image_folder"
    assert folder["data"]["root"] == str(trained["root"])
    assert folder["data"]["label"] == f"image folder {trained['root']} (16×16)"
    assert (folder["trainable"], folder["train_model"], folder["not_trainable"]) == (
        True,
        "resnet18",
        None,
    )
    assert (logged["architecture"], logged["data"]["label"]) == (
        "cnn_mnist",
        "MNIST digits (bundled)",
    )
    # every run's curves are one request away, a train.py run's read from its TensorBoard log
    curves = client.get(logged["curves"]).json()
    assert curves["source"] == "tensorboard" and curves["epoch"]["x"] == [1, TB_EPOCHS]
    # TensorBoard's steps count from 0: the last of 50 is 49
    assert curves["step"]["x"][-1] == curves["lr"]["x"][-1] == TB_STEPS - 1
    assert client.get(folder["curves"]).status_code == 200

    models = client.get("/ml/models").json()
    best = {m["name"]: m["best"] for m in models["models"]}
    assert best["torchvision"]["architecture"] == "resnet18"
    assert best["torchvision"]["data"]["kind"] == "image_folder"
    assert best["cnn_mnist"]["data"]["source"] == "bundled"
    assert {"cnn_mnist", "mlp_mnist", "resnet18", "mobilenet_v3_small"} <= set(
        models["train_models"]
    )
    assert "llama_char" not in models["train_models"]  # a language model, not a classifier


@pytest.mark.slow
def test_data_outside_the_allowed_folders_is_not_trained_again(
    make_client, trained, tmp_path: Path
) -> None:
    # the default train.data_dirs: this server's paths.data_dir (tmp_path/data in tests)
    client = make_client(runs_dir=trained["runs"])
    folder = _by_run(client.get("/ml/runs").json())[FOLDER_RUN]
    assert not folder["trainable"] and folder["train_model"] is None
    why = folder["not_trainable"]
    assert str(trained["root"]) in why and "outside the folders this server trains from" in why
    assert str(tmp_path / "data") in why  # the folders it would accept

    refusals = {
        "data_from": ({"model": "resnet18", "data_from": FOLDER_RUN}, str(trained["root"])),
        "no run": ({"model": "resnet18", "data_from": "nope"}, "no run 'nope'"),
        "unknown model": ({"model": "resnet50"}, "accepted: cnn_mnist, mlp_mnist, torchvision"),
    }
    for name, (body, expected) in refusals.items():
        response = client.post("/ml/train", json=body)
        assert response.status_code == 422, (name, response.text)
        error = response.json()["error"]
        assert expected in error and "\n" not in error, (name, error)
    assert client.get("/ml/jobs").json()["jobs"] == []


@pytest.mark.slow
def test_resnet18_trains_again_on_the_image_folder_its_run_used(
    make_client, trained, tmp_path: Path
) -> None:
    # the job's run lands beside the fixture's (a copy's checkpoints would lead out of it)
    runs = trained["runs"]
    client = make_client(
        runs_dir=runs,
        **{"train.data_dirs": [str(trained["data"])], "jobs.extra_overrides": QUIET},
    )
    body = {"model": "resnet18", "data_from": FOLDER_RUN, "epochs": 1, "batch_size": 16}
    # an MNIST source names other data than the run's folder
    mixed = client.post("/ml/train", json={**body, "data_source": "bundled"})
    assert mixed.status_code == 422 and "data_source" in mixed.json()["error"]
    queued = client.post("/ml/train", json=body)
    assert queued.status_code == 202, queued.text
    # a registered classifier by its config name on the default data (MNIST digits): accepted,
    # then cancelled while it waits behind the first
    plain = client.post("/ml/train", json={"model": "resnet18", "epochs": 1})
    assert plain.status_code == 202, plain.text
    assert client.delete(f"/ml/jobs/{plain.json()['id']}").json()["status"] == "cancelled"

    job = wait_for_job(client, queued.json()["id"], ("succeeded", "failed"), timeout=300)
    assert job["status"] == "succeeded", job["error"]
    record = read_job_record(runs / job["run"])
    assert record["status"] == "ok"
    again = _by_run(client.get("/ml/runs").json())[job["run"]]
    assert (again["architecture"], again["data"]["root"]) == ("resnet18", str(trained["root"]))
    assert again["data"]["image_size"] == 16  # the run's size, not the datamodule's default


@pytest.mark.slow
def test_a_one_cycle_run_logs_its_learning_rate_per_step(
    make_client, trained, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events_dir = next((trained["runs"] / TB_RUN / "tensorboard").rglob("events.out.*")).parent
    events = EventAccumulator(str(events_dir), size_guidance={SCALARS: 0})
    events.Reload()
    rates = events.Scalars("lr-AdamW")
    # one point every LOG_EVERY steps, not one per epoch
    assert len(rates) == TB_STEPS // LOG_EVERY > TB_EPOCHS
    values = [r.value for r in rates]
    peak = values.index(max(values))
    assert 0 < peak < len(values) - 1, values  # one-cycle: up, then down
    assert values[0] < values[peak] and values[-1] < values[peak] / 10

    client = make_client(runs_dir=trained["runs"])
    curves = client.get(f"/ml/runs/{TB_RUN}/curves").json()
    assert curves["lr"]["x"] == [r.step for r in rates]
    assert curves["lr"]["series"]["lr-AdamW"] == pytest.approx(values)


# ---- in the browser -------------------------------------------------------------------------


@pytest.fixture
def runs_server(tmp_path: Path, trained) -> Iterator[str]:
    cfg = serve_config(
        tmp_path,
        runs_dir=trained["runs"],
        **{"paths.models_dir": str(tmp_path / "models")},
    )
    with live_server(create_app(cfg)) as url:
        yield url


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_a_train_py_runs_curves_open_with_one_click(browser, runs_server: str) -> None:
    browser.get(runs_server + "/")
    folder_row = f'#runs-table tr[data-run="{FOLDER_RUN}"]'
    _wait(browser, lambda d: _text(d, f"{folder_row} .architecture") == "resnet18", 60)
    # the image-folder run shows what it is, and why the server cannot train its data here
    assert _text(browser, f"{folder_row} .data").startswith("image folder ")
    assert "outside the folders" in _text(browser, f"{folder_row} .not-trainable")
    assert "resnet18 on image folder" in _text(browser, "tr[data-model=torchvision] .trained")

    browser.execute_script(
        f"document.querySelector('#runs-table tr[data-run=\"{TB_RUN}\"] .curves-btn').click()"
    )
    curves = httpx.get(f"{runs_server}/ml/runs/{TB_RUN}/curves").json()
    steps = len(curves["step"]["x"])
    _wait(browser, lambda d: d.execute_script(POINTS, "chart-step-loss") == steps > 0, 60)
    assert browser.execute_script(POINTS, "chart-lr") == TB_STEPS // LOG_EVERY
    assert browser.execute_script(POINTS, "chart-epoch-acc") == TB_EPOCHS
    assert browser.execute_script(CHART_DRAWN, "chart-lr")
    title = _text(browser, "#curves-title")
    assert f"run {TB_RUN}" in title and "TensorBoard" in title
    assert _text(browser, "#error") == ""
    listed = httpx.get(f"{runs_server}/ml/runs").json()["runs"]
    buttons = "return document.querySelectorAll('#runs-table .curves-btn').length"
    assert browser.execute_script(buttons) == len(listed) >= 2
