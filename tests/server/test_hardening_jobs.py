"""Issue 23, points 9 and 10: a jobs database with damaged rows and full disks, against a live
server. A damaged row is reported by id and the rest are served; a full disk is a 507 naming
the folder, and everything works again once space is freed, without a restart."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from ml_engine.server import create_app
from ml_engine.server.jobs_store import (
    CANCELLED,
    FAILED,
    JOB_STATUSES,
    QUEUED,
    RUNNING,
    JobStore,
)
from tests.server.conftest import (
    fill_disk,
    held_job_overrides,
    live_server,
    serve_config,
    wait_for_job,
)

# ---- a damaged job store --------------------------------------------------------------------


def _add_job(store: JobStore, job_id: str, marker: str, status: str, **values) -> None:
    """A job whose request and overrides hold ``marker``, to find its bytes in the file."""
    store.create(
        job_id, "mlp_mnist", {"marker": marker}, [f"marker={marker}"], f"/nonexistent/{job_id}"
    )
    store.update(job_id, status=status, **values)


def _flip(db: Path, where: bytes, old: bytes, new: bytes) -> None:
    """Overwrite ``old`` with ``new`` (as long) inside the one place ``where`` is in the file,
    as a flipped bit on disk would: no SQLite call, and ``PRAGMA quick_check`` still passes."""
    assert len(old) == len(new) and old in where
    data = db.read_bytes()
    assert data.count(where) == 1, f"{where!r} is in the file {data.count(where)} times"
    start = data.index(where) + where.index(old)
    db.write_bytes(data[:start] + new + data[start + len(old) :])
    with contextlib.closing(sqlite3.connect(db)) as check:
        assert check.execute("PRAGMA quick_check").fetchall() == [("ok",)]


def _raw_row(db: Path, job_id: str) -> tuple[str, str | None]:
    with contextlib.closing(sqlite3.connect(db)) as raw:
        return raw.execute("SELECT status, error FROM jobs WHERE id = ?", (job_id,)).fetchone()


def _raw_pid(db: Path, job_id: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as raw:
        return raw.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def test_damaged_rows_are_reported_and_the_rest_served(tmp_path) -> None:
    cfg = serve_config(tmp_path)
    db = Path(cfg.jobs_db)
    store = JobStore(db)
    _add_job(store, "good00000001", "AAAAAAAA", "succeeded", metrics={"test/acc": 0.9})
    _add_job(store, "notutf800002", "BBBBBBBB", FAILED, error="lr too high")
    _add_job(store, "notjson00003", "CCCCCCCC", CANCELLED)
    _add_job(store, "badstatus004", "DDDDDDDD", QUEUED)
    store.close()  # checkpointed into the file
    _flip(db, b'"BBBBBBBB"', b"BBBB", b"B\xff\xfeB")  # request: not UTF-8
    _flip(db, b'{"marker": "CCCCCCCC"}', b"{", b"#")  # request: not JSON
    # the row's status only: the status index (a copy) still files it as queued
    _flip(db, b'mlp_mnistqueued{"marker": "DDDDDDDD', b"queued", b"queuxd")

    with live_server(create_app(cfg)) as url, httpx.Client(base_url=url, timeout=30) as client:
        response = client.get("/ml/jobs")
        assert response.status_code == 200, response.text
        listing = response.json()
        assert [job["id"] for job in listing["jobs"]] == ["good00000001"]
        assert listing["jobs"][0]["metrics"] == {"test/acc": 0.9}
        problems = {entry["id"]: entry["problem"] for entry in listing["damaged"]}
        assert problems.pop("notjson00003").startswith("request is not valid JSON (")
        assert problems == {
            "notutf800002": "request is not valid UTF-8",
            "badstatus004": "status 'queuxd' is not a job status",
        }

        # ?status= agrees with the full list, whatever the index says
        for status in JOB_STATUSES:
            filtered = client.get("/ml/jobs", params={"status": status})
            assert filtered.status_code == 200, filtered.text
            ids = [job["id"] for job in filtered.json()["jobs"]]
            assert ids == [job["id"] for job in listing["jobs"] if job["status"] == status]
            assert "badstatus004" not in str(filtered.json())
        failed = client.get("/ml/jobs", params={"status": FAILED}).json()
        assert failed["damaged"] == [
            {"id": "notutf800002", "problem": "request is not valid UTF-8"}
        ]

        assert client.get("/ml/jobs/good00000001").json()["status"] == "succeeded"
        one = client.get("/ml/jobs/notjson00003")
        assert one.status_code == 500
        error = one.json()["error"]
        assert "\n" not in error and "job 'notjson00003' has a damaged record" in error
        # nor does the queue count (read by status), nor the runner, which never starts it
        assert 'ml_engine_training_jobs{status="queued"} 0.0' in client.get("/metrics").text
        assert _raw_row(db, "badstatus004") == ("queuxd", None)


def test_a_damaged_running_job_does_not_keep_the_server_from_starting(tmp_path) -> None:
    cfg = serve_config(tmp_path)
    db = Path(cfg.jobs_db)
    store = JobStore(db)
    # left running by a server that died; its process is long gone
    _add_job(store, "running00001", "EEEEEEEE", RUNNING, pid=2**22 + 11, started_at=time.time())
    _add_job(store, "queued000002", "FFFFFFFF", QUEUED)
    store.close()
    _flip(db, b'["marker=EEEEEEEE"]', b"[", b"#")  # overrides: not JSON
    _flip(db, b'["marker=FFFFFFFF"]', b"]", b"}")

    with live_server(create_app(cfg)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        # the runner settled the one and refused to run the other, and serves on
        deadline = time.monotonic() + 30
        while _raw_row(db, "queued000002")[0] == QUEUED:
            assert time.monotonic() < deadline, "the damaged queued job stayed queued"
            time.sleep(0.2)
        listing = client.get("/ml/jobs").json()
        assert listing["jobs"] == []
        assert [entry["id"] for entry in listing["damaged"]] == ["queued000002", "running00001"]
        assert all(
            e["problem"].startswith("overrides is not valid JSON") for e in listing["damaged"]
        )
    status, error = _raw_row(db, "running00001")
    assert status == FAILED and "server stopped" in error
    status, error = _raw_row(db, "queued000002")
    assert status == FAILED and error.startswith("its stored record is damaged (overrides")
    assert not Path("/nonexistent/queued000002").exists()


# ---- a full disk ----------------------------------------------------------------------------


def test_a_full_jobs_database_folder_is_a_507_until_space_is_freed(tmp_path, tmpfs) -> None:
    disk = tmpfs("jobs-disk", "2m")
    cfg = serve_config(tmp_path, jobs_db=str(disk / "jobs.sqlite"))
    with live_server(create_app(cfg)) as url, httpx.Client(base_url=url, timeout=30) as client:
        filler = fill_disk(disk)
        for path, body in (("/ml/train", {"model": "mlp_mnist"}), ("/ml/train-all", {})):
            response = client.post(path, json=body)
            assert response.status_code == 507, response.text
            error = response.json()["error"]
            assert error == (
                f"no space left in {disk} (the jobs database); free some space there and retry"
            )
            assert response.json()["folder"] == str(disk)
        assert client.get("/ml/jobs").json() == {"jobs": []}  # nothing half-written
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
        assert client.get("/health").status_code == 200

        filler.unlink()
        response = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1})
        assert response.status_code == 202, response.text
        job = response.json()
        assert [j["id"] for j in client.get("/ml/jobs").json()["jobs"]] == [job["id"]]
        client.delete(f"/ml/jobs/{job['id']}")
        assert wait_for_job(client, job["id"], ("cancelled",))["status"] == "cancelled"


@pytest.mark.slow
def test_a_full_runs_folder_fails_the_job_with_why_and_recovers(tmp_path, tmpfs) -> None:
    runs = tmpfs("runs-disk", "64m")
    cfg = serve_config(tmp_path, runs_dir=runs)
    with live_server(create_app(cfg)) as url, httpx.Client(base_url=url, timeout=30) as client:
        filler = fill_disk(runs)
        job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
        failed = wait_for_job(client, job["id"], ("failed", "succeeded", "cancelled"))
        assert failed["status"] == "failed"
        assert failed["error"].startswith(f"no space left in {runs} for the run (0 bytes free;")
        assert failed["error"].endswith("free some space there and submit the job again")

        filler.unlink()
        job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
        done = wait_for_job(client, job["id"], ("failed", "succeeded", "cancelled"))
        assert done["status"] == "succeeded", done["error"]
        assert Path(done["run_dir"], "checkpoints", "best.ckpt").is_file()


@pytest.mark.slow
def test_a_job_that_ends_while_the_jobs_database_is_full_is_recorded_once_freed(
    tmp_path, tmpfs
) -> None:
    disk, release = tmpfs("jobs-disk", "2m"), tmp_path / "release"
    overrides = {"jobs.extra_overrides": held_job_overrides(5, release)}
    cfg = serve_config(tmp_path, jobs_db=str(disk / "jobs.sqlite"), **overrides)
    with live_server(create_app(cfg)) as url, httpx.Client(base_url=url, timeout=30) as client:
        job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 1}).json()
        wait_for_job(client, job["id"], ("running",))
        pid = _raw_pid(Path(cfg.jobs_db), job["id"])
        filler = fill_disk(disk)
        release.touch()
        # the training ends and the runner reaps it, but cannot write its outcome
        deadline = time.monotonic() + 300
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "the training never ended"
            time.sleep(0.2)
        assert client.get(f"/ml/jobs/{job['id']}").json()["status"] == RUNNING
        assert client.post("/ml/train", json={"model": "mlp_mnist"}).status_code == 507

        filler.unlink()  # the outcome is written at the next tick, no restart
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=60)
        assert done["status"] == "succeeded", done["error"]
        assert done["metrics"]["epochs_run"] == 1
