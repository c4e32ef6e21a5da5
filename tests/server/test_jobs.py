"""Training jobs for real: queued → running → succeeded, predict with the new checkpoint,
cancel, restart recovery."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_engine.server import create_app
from ml_engine.server.jobs_store import RUNNING, JobStore
from tests.server.conftest import serve_config, wait_for_job


def _files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    paths = sorted(folder.iterdir())
    return [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]


@pytest.mark.slow
def test_job_lifecycle_then_predict_then_cancel(make_client, digit_pngs) -> None:
    client = make_client()
    response = client.post("/ml/train", json={"model": "cnn_mnist", "epochs": 2, "device": "cpu"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["request"]["epochs"] == 2 and not job["final"]

    # one job at a time: a second one waits queued while the first runs
    second = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1, "seed": 3}).json()
    running = wait_for_job(client, job["id"], ("running", "succeeded", "failed"))
    assert running["status"] == "running", running
    assert client.get(f"/ml/jobs/{second['id']}").json()["status"] == "queued"

    progressed = _wait_for_progress(client, job["id"])
    assert progressed["progress"]["max_epochs"] == 2
    assert progressed["progress"]["batches_per_epoch"] == 25

    done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=400)
    assert done["status"] == "succeeded" and done["final"], done["error"]
    assert done["seen"][-1] == "succeeded" and "running" in done["seen"]
    assert done["metrics"]["epochs_run"] == 2
    assert 0.5 < done["metrics"]["test/acc"] <= 1.0  # chance is 0.1
    assert Path(done["run_dir"], "checkpoints", "best.ckpt").is_file()

    # the new run is the model's best, and predicts real digits through it
    models = {m["name"]: m for m in client.get("/ml/models").json()["models"]}
    assert models["cnn_mnist"]["best"]["run"] == done["run"]
    assert models["cnn_mnist"]["runs"] == 1
    folder, expected = digit_pngs
    response = client.post("/ml/predict", files=_files(folder), data={"run": done["run"]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    names = sorted(p.name for p in folder.iterdir())
    truth = [int(name[1]) for name in names]
    correct = sum(p["digit"] == t for p, t in zip(predictions, truth, strict=True))
    assert len(predictions) == len(expected) and correct >= 0.6 * len(truth), predictions
    for p in predictions:
        assert p["label"] == str(p["digit"])  # a digit model's class names are "0".."9"
        assert abs(sum(p["probabilities"]) - 1) < 1e-3 and p["digit"] == int(
            np.argmax(p["probabilities"])
        )

    # the queued job started when the first ended; cancel it while it runs
    wait_for_job(client, second["id"], ("running",))
    response = client.delete(f"/ml/jobs/{second['id']}")
    assert response.status_code == 200
    cancelled = wait_for_job(client, second["id"], ("cancelled", "failed", "succeeded"))
    assert cancelled["status"] == "cancelled"
    assert client.delete(f"/ml/jobs/{second['id']}").status_code == 409
    listed = client.get("/ml/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [second["id"], job["id"]]


def _wait_for_progress(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/ml/jobs/{job_id}").json()
        if job["progress"].get("step", 0) > 0 or job["status"] != "running":
            return job
        time.sleep(0.2)
    raise AssertionError("no progress reported")


def test_cancel_a_queued_job(make_client) -> None:
    client = make_client()
    first = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
    second = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
    response = client.delete(f"/ml/jobs/{second['id']}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    client.delete(f"/ml/jobs/{first['id']}")
    assert wait_for_job(client, first["id"], ("cancelled",))["status"] == "cancelled"
    time.sleep(1)
    assert client.get(f"/ml/jobs/{second['id']}").json()["started_at"] is None


def test_train_all_queues_one_job_per_network(make_client) -> None:
    client = make_client(**{"train.models": ["mlp_mnist"]})
    response = client.post("/ml/train-all", json={"epochs": 1})
    assert response.status_code == 202
    jobs = response.json()["jobs"]
    assert [j["model"] for j in jobs] == ["mlp_mnist"]
    refused = client.post("/ml/train", json={"model": "cnn_mnist"})
    assert refused.status_code == 422 and "accepted: mlp_mnist" in refused.json()["error"]
    for job in jobs:
        client.delete(f"/ml/jobs/{job['id']}")
        wait_for_job(client, job["id"], ("cancelled",))


def test_failed_training_is_a_failed_job_with_its_error(make_client) -> None:
    client = make_client(**{"jobs.extra_overrides": ["datamodule.val_fraction=7"]})
    job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
    failed = wait_for_job(client, job["id"], ("failed", "succeeded", "cancelled"), timeout=200)
    assert failed["status"] == "failed"
    assert failed["error"] and "\n" not in failed["error"]
    assert client.get("/health").json()["status"] == "ok"


def test_jobs_survive_a_restart_and_running_ones_fail(tmp_path) -> None:
    from fastapi.testclient import TestClient

    cfg = serve_config(tmp_path)
    with TestClient(create_app(cfg)) as client:
        queued = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
        client.delete(f"/ml/jobs/{queued['id']}")
        wait_for_job(client, queued["id"], ("cancelled",))
    # a server that died (no shutdown) with a job marked running
    store = JobStore(Path(cfg.jobs_db))
    store.create("deadbeef0000", "mlp_mnist", {}, [], str(tmp_path / "runs" / "x"))
    store.update("deadbeef0000", status=RUNNING, pid=2**22 + 7, started_at=time.time())
    store.close()
    with TestClient(create_app(cfg)) as client:
        jobs = {j["id"]: j for j in client.get("/ml/jobs").json()["jobs"]}
        assert jobs[queued["id"]]["status"] == "cancelled"
        assert jobs["deadbeef0000"]["status"] == "failed"
        assert "server stopped" in jobs["deadbeef0000"]["error"]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_predict_from_the_best_run(make_client, trained_runs, bundled_digits) -> None:
    client = make_client(runs_dir=trained_runs)
    models = {m["name"]: m for m in client.get("/ml/models").json()["models"]}
    best = models["cnn_mnist"]["best"]
    assert best["run"] == "2025-01-01_00-00-00_fixture" and 0.5 < best["val_acc"] <= 1
    assert models["mlp_mnist"]["best"] is None

    images, labels = bundled_digits
    picks = [int(np.flatnonzero(labels == d)[-3]) for d in range(10)]
    # JSON arrays, uint8 scale and [0, 1] scale give the same answer
    as_uint8 = client.post("/ml/predict", json={"images": images[picks].tolist()}).json()
    as_unit = client.post(
        "/ml/predict", json={"images": (images[picks] / 255.0).tolist(), "model": "cnn_mnist"}
    ).json()
    digits = [p["digit"] for p in as_uint8["predictions"]]
    assert digits == [p["digit"] for p in as_unit["predictions"]]
    assert sum(d == t for d, t in zip(digits, labels[picks], strict=True)) >= 6
    assert as_uint8["run"] == best["run"] and as_uint8["model"] == "cnn_mnist"

    # one PNG upload (the original engine's planned request) and a named run
    one = _png(images[picks[7]])
    response = client.post("/ml/predict", files={"image": ("seven.png", one, "image/png")})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["name"] == "seven.png"
    named = client.post(
        "/ml/predict", files={"image": ("s.png", one)}, data={"run": best["run"]}
    ).json()
    assert (
        named["predictions"][0]["probabilities"]
        == response.json()["predictions"][0]["probabilities"]
    )
    missing = client.post("/ml/predict", files={"image": ("s.png", one)}, data={"run": "nope"})
    assert missing.status_code == 422 and "unknown run 'nope'" in missing.json()["error"]
    wrong = client.post(
        "/ml/predict",
        files={"image": ("s.png", one)},
        data={"run": best["run"], "model": "mlp_mnist"},
    )
    assert wrong.status_code == 422
    # the checkpoint is loaded once and reused
    assert client.app.state.server.predictor.cached_checkpoints() == [best["checkpoint"]]
    assert json.loads(json.dumps(as_uint8))  # plain JSON, no NaN


def test_one_server_per_jobs_database(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from ml_engine.errors import UserError

    cfg = serve_config(tmp_path)
    with (
        TestClient(create_app(cfg)),
        pytest.raises(UserError, match="is in use by another server"),
    ):
        create_app(cfg)
    with TestClient(create_app(cfg)) as client:  # free again once the first one stopped
        assert client.get("/ml/jobs").status_code == 200


def _filled_store(path: Path, jobs: int = 400) -> None:
    """A jobs database of many pages, closed (checkpointed into the main file)."""
    store = JobStore(path)
    for index in range(jobs):
        store.create(f"job{index:09d}", "mlp_mnist", {"pad": "x" * 400}, [], "/tmp/x")
    store.close()


@pytest.mark.parametrize("damage", ["garbage-middle", "zero-length"])
def test_a_damaged_jobs_database_is_moved_aside(tmp_path, caplog, damage: str) -> None:
    import os

    from fastapi.testclient import TestClient

    cfg = serve_config(tmp_path)
    db = Path(cfg.jobs_db)
    db.parent.mkdir(parents=True)
    if damage == "zero-length":
        db.write_bytes(b"")
    else:
        _filled_store(db)
        data = bytearray(db.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 16384] = os.urandom(16384)
        db.write_bytes(bytes(data))
    before = db.read_bytes()
    with caplog.at_level("WARNING"), TestClient(create_app(cfg)) as client:
        assert client.get("/ml/jobs").json() == {"jobs": []}
        job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
        client.delete(f"/ml/jobs/{job['id']}")
        assert client.get("/ml/jobs").status_code == 200
    moved = sorted(db.parent.glob("jobs.sqlite.corrupt-*"))
    assert [p.name for p in moved if not p.name.endswith(("-wal", "-shm"))] == [moved[0].name]
    assert moved[0].read_bytes() == before  # kept as it was, for inspection
    reason = "is empty (0 bytes)" if damage == "zero-length" else "is damaged"
    warnings = [r.getMessage() for r in caplog.records if "jobs database" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0] and moved[0].name in warnings[0]


def test_the_jobs_database_lock_follows_the_file_not_its_path(tmp_path) -> None:
    import os

    from fastapi.testclient import TestClient

    from ml_engine.errors import UserError

    cfg = serve_config(tmp_path)
    with TestClient(create_app(cfg)):
        link = tmp_path / "elsewhere" / "same.sqlite"
        link.parent.mkdir()
        os.link(cfg.jobs_db, link)  # a second name for the same file
        other = serve_config(tmp_path / "second", jobs_db=str(link))
        with pytest.raises(UserError, match=rf"is in use by another server \(pid {os.getpid()}\)"):
            create_app(other)
