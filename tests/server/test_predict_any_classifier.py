"""/ml/predict for a classifier beyond MNIST: an RGB 32×32 image_folder model trained here,
asked through the server with RGB PNG uploads, answers as predict.py does on the same files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ml_engine.run.files import read_job_record
from tests.conftest import run_entrypoint
from tests.server.conftest import JOB_OVERRIDES
from tests.training.vision.test_image_classification import (
    FAST_TRAINING,
    flatten_to_photos,
    write_digit_folder,
)


@pytest.mark.slow
def test_rgb_image_folder_model_predicts_like_predict_py(
    make_client, tmp_path: Path, bundled_digits
) -> None:
    root = write_digit_folder(tmp_path / "tinted", bundled_digits, per_class=30, rgb=True)
    run_dir = tmp_path / "runs" / "2025-01-02_00-00-00_rgb"
    trained = run_entrypoint(
        "train.py",
        "model=cnn_mnist",
        "datamodule=image_folder",
        f"datamodule.root={root}",
        "datamodule.image_size=32",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={run_dir}",
        *FAST_TRAINING,
        *[o for o in JOB_OVERRIDES if not o.startswith("datamodule.")],
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = read_job_record(run_dir)["metrics"]["best_ckpt"]

    unseen = write_digit_folder(
        tmp_path / "unseen", bundled_digits, per_class=1, rgb=True, offset=400
    )
    photos = flatten_to_photos(unseen, tmp_path / "photos")
    output = tmp_path / "preds.csv"
    predicted = run_entrypoint(
        "predict.py",
        f"ckpt_path={checkpoint}",
        f"input={photos}",
        f"output={output}",
        f"paths.log_dir={tmp_path}",
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with output.open() as handle:
        expected = {Path(r["path"]).name: r for r in csv.DictReader(handle)}

    client = make_client(runs_dir=tmp_path / "runs")
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in sorted(photos.iterdir())]
    response = client.post("/ml/predict", files=files)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == len(expected) == 10
    for row in rows:
        want = expected[row["name"]]
        assert row["label"] == want["prediction"]
        assert abs(row["confidence"] - float(want["confidence"])) < 1e-5
        assert len(row["probabilities"]) == 10

    # 28×28 digit arrays are not this model's input: a one-line 422, not a wrong answer
    refused = client.post("/ml/predict", json={"images": [[[0] * 28] * 28]})
    assert refused.status_code == 422 and "32×32" in refused.json()["error"]
