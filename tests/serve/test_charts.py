"""The chart views: a job's curves while and after it trains, sweep summaries and their plot."""

from __future__ import annotations

import time
from pathlib import Path

from tests.serve.conftest import write_sweeps


def test_a_job_records_its_curves_per_step_and_per_epoch(make_client) -> None:
    client = make_client()
    job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 2}).json()
    seen_steps = []
    deadline = time.monotonic() + 300
    while not (current := client.get(f"/ml/jobs/{job['id']}").json())["final"]:
        curves = client.get(f"/ml/jobs/{job['id']}/curves").json()
        seen_steps.append(len(curves["step"]["x"]))
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert current["status"] == "succeeded", current
    curves = client.get(f"/ml/jobs/{job['id']}/curves").json()
    assert curves["final"] and curves["source"] == "progress" and curves["run"] == current["run"]
    # 25 batches an epoch (JOB_OVERRIDES), one point per step, one per epoch
    assert curves["step"]["x"] == list(range(1, 51))
    assert len(curves["step"]["series"]["train/loss_step"]) == 50
    epoch = curves["epoch"]
    assert epoch["x"] == [1, 2]
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(epoch["series"])
    assert all(0 <= acc <= 1 for acc in epoch["series"]["val/acc"])
    # the same run by its name
    by_run = client.get(f"/ml/runs/{current['run']}/curves").json()
    assert by_run["epoch"] == epoch
    # read while it ran: the points grew, never shrank
    assert any(0 < count < 50 for count in seen_steps), seen_steps
    assert seen_steps == sorted(seen_steps)


def test_curves_of_unknown_jobs_and_runs_are_one_line_404s(make_client, trained_runs) -> None:
    client = make_client(runs_dir=trained_runs)
    for path in (
        "/ml/jobs/nope/curves",
        "/ml/runs/nope/curves",
        "/ml/runs/..%2F..%2Fetc/curves",
        "/ml/runs/.hidden/curves",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "\n" not in response.json()["error"]
    # a run without a progress file nor CSV log: empty series, not an error
    empty = client.get("/ml/runs/2025-01-01_00-00-00_fixture/curves").json()
    assert empty["source"] is None and empty["step"]["x"] == [] and empty["epoch"]["x"] == []


def test_sweeps_are_listed_sorted_by_their_metric_with_their_plot(
    make_client, tmp_path: Path
) -> None:
    dirs = write_sweeps(tmp_path / "outputs")
    client = make_client(sweeps_dirs={k: str(v) for k, v in dirs.items()})
    sweeps = {s["kind"]: s for s in client.get("/ml/sweeps").json()["sweeps"]}
    assert set(sweeps) == {"train", "generate"}
    assert sweeps["train"]["jobs"] == 3 and not sweeps["train"]["has_plot"]
    assert sweeps["generate"]["has_plot"]

    train = client.get(f"/ml/sweeps/{sweeps['train']['name']}").json()
    assert (train["metric"], train["mode"], train["plot"]) == ("val/acc_best", "max", None)
    assert [r["value"] for r in train["rows"]] == [0.93, 0.61, None]
    assert [r["status"] for r in train["rows"]] == ["ok", "ok", "failed"]
    assert train["rows"][0]["overrides"] == "model.optimizer.lr=0.001"

    generate = client.get(f"/ml/sweeps/{sweeps['generate']['name']}").json()
    assert [r["value"] for r in generate["rows"]] == [20.25, 12.5]
    picture = client.get(generate["plot"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(b"\x89PNG")

    for path in (
        "/ml/sweeps/nope",
        "/ml/sweeps/..%2Fmultiruns",
        f"/ml/sweeps/{sweeps['train']['name']}/summary.png",  # a train sweep has no plot
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "\n" not in response.json()["error"]
