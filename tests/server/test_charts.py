"""The chart views: a job's curves while and after it trains, sweep summaries and their plot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.server.conftest import held_job_overrides, write_study, write_sweeps


@pytest.mark.slow
def test_a_job_records_its_curves_per_step_and_per_epoch(make_client, tmp_path: Path) -> None:
    # the job waits after step 30 (in its second epoch) until the test has seen its curves
    release = tmp_path / "release"
    client = make_client(**{"jobs.extra_overrides": held_job_overrides(30, release)})
    job = client.post("/ml/train", json={"model": "mlp_mnist", "epochs": 2}).json()
    seen_steps = []
    deadline = time.monotonic() + 300
    while not (current := client.get(f"/ml/jobs/{job['id']}").json())["final"]:
        curves = client.get(f"/ml/jobs/{job['id']}/curves").json()
        seen_steps.append(len(curves["step"]["x"]))
        if seen_steps[-1] == 30:
            assert curves["epoch"]["x"] == [1] and not curves["final"]
            release.touch()
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
    # the one-cycle schedule changes every step: its whole curve, rising then falling
    rates = curves["lr"]["series"]["lr-AdamW"]
    assert curves["lr"]["x"] == list(range(1, 51)) and len(rates) == 50
    peak = rates.index(max(rates))
    assert 0 < peak < 49 and rates[0] < rates[peak] > rates[-1]
    # the same run by its name
    by_run = client.get(f"/ml/runs/{current['run']}/curves").json()
    assert by_run["epoch"] == epoch
    # read while it ran: the points grew, never shrank
    assert 30 in seen_steps and release.exists(), seen_steps
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


def test_a_sweeps_study_plots_are_listed_and_served_and_nothing_else(
    make_client, tmp_path: Path
) -> None:
    dirs = write_sweeps(tmp_path / "outputs")
    sweep_dir = dirs["train"] / "2025-01-02_00-00-00_train-sweep"
    write_study(sweep_dir)
    (sweep_dir / "study" / "notes.txt").write_text("not listed")
    (tmp_path / "secret.txt").write_text("outside")
    client = make_client(sweeps_dirs={k: str(v) for k, v in dirs.items()})
    name = sweep_dir.name

    study = client.get(f"/ml/sweeps/{name}").json()["study"]
    assert [p["name"] for p in study] == ["history", "importances", "parallel_coordinate"]
    assert study[0]["title"] == "Optimization history: val/acc_best"
    assert study[0]["png"] == f"/ml/sweeps/{name}/study/history.png"
    for plot in study:
        picture = client.get(plot["png"])
        assert picture.headers["content-type"] == "image/png"
        assert picture.content.startswith(b"\x89PNG")
        page = client.get(plot["html"])
        assert page.headers["content-type"].startswith("text/html")
        # Optuna's page runs in a sandbox: no access to the UI's origin (its stored API key)
        assert "sandbox allow-scripts" in page.headers["content-security-policy"]
        assert '<script charset="utf-8" src="plotly.min.js">' in page.text
    script = client.get(f"/ml/sweeps/{name}/study/plotly.min.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert len(script.content) > 1_000_000
    # a generation sweep without a study lists none
    assert client.get("/ml/sweeps/2025-01-02_00-00-00_generate-sweep").json()["study"] == []

    for path in (
        f"/ml/sweeps/{name}/study/notes.txt",  # in the folder, not in index.json
        f"/ml/sweeps/{name}/study/index.json",
        f"/ml/sweeps/{name}/study/..%2F..%2F..%2F..%2Fsecret.txt",
        f"/ml/sweeps/{name}/study/%2E%2E%2Fsummary.json",
        f"/ml/sweeps/{name}/study/..%2Fsummary.json",
        f"/ml/sweeps/{name}/study/%2Fetc%2Fpasswd",
        f"/ml/sweeps/{name}/study/nope.png",
        "/ml/sweeps/..%2Ftrain/study/history.png",
        "/ml/sweeps/2025-01-02_00-00-00_generate-sweep/study/history.png",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        error = response.json()["error"]
        assert "\n" not in error and error, path

    # a listed file swapped for a link to a file outside: refused, not followed
    (sweep_dir / "study" / "history.png").unlink()
    (sweep_dir / "study" / "history.png").symlink_to(tmp_path / "secret.txt")
    assert client.get(f"/ml/sweeps/{name}/study/history.png").status_code == 404


# the CSV logger's file from a real 2-epoch run (logger=csv), cut to the columns that matter
CSV_LOG = """\
epoch,hp/train/loss_step,lr-AdamW,step,test/acc,train/acc,train/loss,train/loss_step,val/acc,val/acc_best
,,8e-05,0,,,,,,
0,,,19,,,,1.4695,,
0,,,24,,,,,0.68,0.68
0,,,24,,0.333,1.9468,,,
1,,,39,,,,1.3282,,
1,,,49,,,,,0.7639,0.7639
1,,,49,,0.5774,1.4334,,,
2,,,50,0.796,,,,,
,1.2435,,50,,,,,,
"""


def test_a_run_logged_by_the_csv_logger_has_curves_too(tmp_path: Path) -> None:
    from ml_engine.server.charts import read_curves

    log = tmp_path / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text(CSV_LOG)
    curves = read_curves(tmp_path)
    assert curves["source"] == "csv"
    assert curves["step"] == {"x": [19, 39], "series": {"train/loss_step": [1.4695, 1.3282]}}
    # epochs counted from 1 as everywhere else in the UI; no test/*, hp/* nor *_best series
    assert curves["epoch"] == {
        "x": [1, 2],
        "series": {
            "train/acc": [0.333, 0.5774],
            "train/loss": [1.9468, 1.4334],
            "val/acc": [0.68, 0.7639],
        },
    }
