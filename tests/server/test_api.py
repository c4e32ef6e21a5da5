"""The API against the real app: every endpoint's contract and error paths (no training)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ml_engine.server.jobs_store import JOB_STATUSES
from ml_engine.training.choices import ACCELERATORS, INVERT_CHOICES, SOURCES

ORIGINAL_TRAIN_REQUEST = {"model": "cnn_mnist", "epochs": 3, "device": "cpu"}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health(make_client) -> None:
    response = make_client().get("/health")
    assert response.status_code == 200
    assert response.json() == {"service": "ml-engine", "status": "ok"}


def test_openapi_schema_lists_every_endpoint(make_client) -> None:
    schema = make_client().get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/health",
        "/ml/models",
        "/ml/train",
        "/ml/train-all",
        "/ml/jobs",
        "/ml/jobs/{job_id}",
        "/ml/predict",
        "/llm/generate",
        "/llm/models",
    ):
        assert path in paths, path
    assert set(paths["/ml/predict"]["post"]["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
    }
    assert schema["components"]["schemas"]["TrainRequest"]["additionalProperties"] is False


def test_models_without_runs(make_client) -> None:
    body = make_client().get("/ml/models").json()
    names = [m["name"] for m in body["models"]]
    assert {"cnn_mnist", "mlp_mnist"} <= set(names)
    assert all(m["best"] is None and m["runs"] == 0 for m in body["models"])


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({**ORIGINAL_TRAIN_REQUEST, "llama_exec_path": "/bin/sh"}, "llama_exec_path"),
        ({**ORIGINAL_TRAIN_REQUEST, "extra_args": "--x"}, "extra_args"),
        ({**ORIGINAL_TRAIN_REQUEST, "hydra.run.dir": "/"}, "hydra.run.dir"),
    ],
)
def test_train_refuses_unknown_fields(make_client, body: dict, named: str) -> None:
    response = make_client().post("/ml/train", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert named in error and "accepted: " in error and "epochs" in error


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"epochs": 0}, "epochs=0 is out of range; allowed: [1, 100]"),
        ({"epochs": 101}, "epochs=101 is out of range; allowed: [1, 100]"),
        ({"batch_size": 100000}, "batch_size=100000 is out of range; allowed: [1, 4096]"),
        ({"lr": 5.0}, "lr=5.0 is out of range"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"device": "tpu"}, "device"),
        ({"model": "resnet"}, "unknown model 'resnet'; accepted: cnn_mnist, mlp_mnist"),
        ({"model": "../../etc/passwd"}, "is not a name"),
        ({"model": "..%2f.."}, "is not a name"),
        ({"model": "cnn_mnist/../x"}, "is not a name"),
        ({"epochs": "three"}, "epochs"),
    ],
)
def test_train_rejects_bad_values(make_client, change: dict, expected: str) -> None:
    client = make_client()
    response = client.post("/ml/train", json={**ORIGINAL_TRAIN_REQUEST, **change})
    assert response.status_code == 422, response.text
    assert expected in response.json()["error"]
    assert client.get("/ml/jobs").json()["jobs"] == []


def test_requests_are_checked_by_the_training_rules_too(make_client) -> None:
    # limits looser than what a training job accepts: the job's own rule still refuses
    client = make_client(**{"limits.lr": [0, 1], "limits.weight_decay": [-1, 1]})
    response = client.post("/ml/train", json={**ORIGINAL_TRAIN_REQUEST, "lr": 0})
    assert response.status_code == 422
    assert response.json()["error"] == "lr=0.0 is not valid; expected a number > 0"
    response = client.post("/ml/train", json={**ORIGINAL_TRAIN_REQUEST, "weight_decay": -0.5})
    assert response.json()["error"] == "weight_decay=-0.5 is not valid; expected a number ≥ 0"
    assert client.get("/ml/jobs").json()["jobs"] == []


def test_server_defaults_are_checked_by_the_training_rules(make_client) -> None:
    # train.defaults skip the request schema, not the rules
    client = make_client(**{"train.defaults.data_source": "kaggle"})
    response = client.post("/ml/train", json=ORIGINAL_TRAIN_REQUEST)
    assert response.status_code == 422
    assert response.json()["error"] == (
        "data_source='kaggle' is not valid; expected one of auto, torchvision, bundled"
    )
    assert client.get("/ml/jobs").json()["jobs"] == []


def test_weight_decay_has_a_configured_range(make_client) -> None:
    client = make_client()
    response = client.post("/ml/train", json={**ORIGINAL_TRAIN_REQUEST, "weight_decay": 2.0})
    assert response.json()["error"] == "weight_decay=2.0 is out of range; allowed: [0, 1]"


def test_weight_decay_range_comes_from_the_config(make_client) -> None:
    client = make_client(**{"limits.weight_decay": [0, 0.1]})
    response = client.post("/ml/train", json={**ORIGINAL_TRAIN_REQUEST, "weight_decay": 0.5})
    assert response.json()["error"] == "weight_decay=0.5 is out of range; allowed: [0, 0.1]"


def test_the_schema_offers_the_packages_own_lists(make_client) -> None:
    schema = make_client().get("/openapi.json").json()
    components = schema["components"]["schemas"]

    def enum(model: str, field: str) -> list[str]:
        prop = components[model]["properties"][field]
        return next(option["enum"] for option in prop.get("anyOf", [prop]) if "enum" in option)

    assert enum("TrainRequest", "device") == list(ACCELERATORS)
    assert enum("TrainRequest", "data_source") == list(SOURCES)
    assert enum("JobView", "status") == list(JOB_STATUSES)
    multipart = schema["paths"]["/ml/predict"]["post"]["requestBody"]["content"]
    invert = multipart["multipart/form-data"]["schema"]["properties"]["invert"]
    assert invert["enum"] == list(INVERT_CHOICES)


def test_job_status_filter_names_the_statuses(make_client) -> None:
    response = make_client().get("/ml/jobs", params={"status": "exploded"})
    assert response.status_code == 422
    assert response.json()["error"].endswith("accepted: " + ", ".join(JOB_STATUSES))


def test_limits_come_from_the_config(make_client) -> None:
    client = make_client(**{"limits.epochs": [1, 2]})
    response = client.post("/ml/train", json={**ORIGINAL_TRAIN_REQUEST, "epochs": 3})
    assert response.status_code == 422
    assert response.json()["error"] == "epochs=3 is out of range; allowed: [1, 2]"


def test_models_lists_the_devices_this_machine_has(make_client) -> None:
    import torch

    body = make_client().get("/ml/models").json()
    assert {"cpu", "auto"} <= set(body["devices"])
    has_cuda = torch.cuda.is_available()
    assert ("gpu" in body["devices"]) == has_cuda and ("cuda" in body["devices"]) == has_cuda
    assert body["default_device"] == "cpu"  # train.defaults.device in conf/serve.yaml


def test_default_device_is_null_when_the_configured_one_is_missing(make_client) -> None:
    client = make_client(**{"train.defaults.device": "mps"})
    if "mps" in client.app.state.server.devices:
        pytest.skip("this machine has an MPS device")
    assert client.get("/ml/models").json()["default_device"] is None


def test_train_with_a_device_the_server_lacks(make_client) -> None:
    client = make_client()
    if "gpu" in client.app.state.server.devices:
        pytest.skip("this machine has a GPU")
    response = client.post("/ml/train", json={**ORIGINAL_TRAIN_REQUEST, "device": "cuda"})
    assert response.status_code == 422
    assert "not available on this server; accepted: cpu, auto" in response.json()["error"]


def test_malformed_bodies_are_4xx_json(make_client) -> None:
    client = make_client()
    cases = [
        client.post(
            "/ml/train", content=b"{not json", headers={"content-type": "application/json"}
        ),
        client.post("/ml/train", json=[1, 2]),
        client.post("/ml/train", json=None),
        client.post("/ml/train-all", json={"epochs": 1000}),
        client.post("/ml/predict", content=b"\x00\x01", headers={"content-type": "image/png"}),
        client.post("/ml/predict", content=b"[", headers={"content-type": "application/json"}),
        client.post("/llm/generate", content=b"{}", headers={"content-type": "application/json"}),
        client.get("/ml/jobs", params={"limit": "lots"}),
        client.get("/ml/jobs", params={"status": "exploded"}),
        client.put("/health"),
        client.get("/no/such/thing"),
    ]
    for response in cases:
        assert 400 <= response.status_code < 500, (response.request.url, response.text)
        assert isinstance(response.json()["error"], str) and response.json()["error"]


def test_unknown_job_is_404(make_client) -> None:
    client = make_client()
    for response in (client.get("/ml/jobs/nope"), client.delete("/ml/jobs/nope")):
        assert response.status_code == 404
        assert "no job 'nope'" in response.json()["error"]


def test_body_size_limit(make_client) -> None:
    client = make_client(**{"limits.max_body_bytes": 2048})
    big = {"images": [[[0] * 28] * 28] * 3}  # ~5 kB of JSON
    response = client.post("/ml/predict", json=big)
    assert response.status_code == 413
    assert response.json()["error"] == "request body too large; allowed: at most 2048 bytes"

    def chunks():  # no Content-Length: counted while read
        yield json.dumps(big).encode()

    response = client.post(
        "/ml/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_predict_before_any_training_is_404(make_client) -> None:
    response = make_client().post("/ml/predict", json={"images": [[[0] * 28] * 28]})
    assert response.status_code == 404
    assert "no trained checkpoint for model 'cnn_mnist'" in response.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"images": []}, "images"),
        ({"images": [[[0] * 27] * 28]}, "images.0"),
        ({"images": [[[0] * 28] * 28], "model": "../x"}, "is not a name"),
        ({"images": [[[0] * 28] * 28], "run": "../../etc"}, "is not a name"),
        ({"images": [[[0] * 28] * 28], "model": "resnet"}, "unknown model 'resnet'"),
        ({"images": [[[0] * 28] * 28], "ckpt_path": "/etc/passwd"}, "unknown field(s): ckpt_path"),
        ({"images": [[[300] * 28] * 28]}, "[0, 255]"),
        ({"images": [[[-1] * 28] * 28]}, "[0, 255]"),
    ],
)
def test_predict_json_errors(make_client, trained_runs, body: dict, expected: str) -> None:
    response = make_client(runs_dir=trained_runs).post("/ml/predict", json=body)
    assert response.status_code == 422, response.text
    assert expected in response.json()["error"]


def test_predict_image_errors(make_client, trained_runs) -> None:
    client = make_client(
        runs_dir=trained_runs, **{"limits.max_images": 2, "limits.max_image_side": 64}
    )
    digit = png_bytes(np.zeros((28, 28), np.uint8))
    cases = {
        "cannot read image 'a.png'": {"image": ("a.png", b"not an image", "image/png")},
        "is GIF; accepted: PNG, JPEG": {"image": ("a.gif", _gif(), "image/gif")},
        "100×80 pixels; allowed: sides in [1, 64]": {
            "image": ("big.png", png_bytes(np.zeros((80, 100), np.uint8)), "image/png")
        },
    }
    for expected, files in cases.items():
        response = client.post("/ml/predict", files=files)
        assert response.status_code == 422, response.text
        assert expected in response.json()["error"]
    response = client.post("/ml/predict", files=[("image", ("d.png", digit, "image/png"))] * 3)
    assert response.status_code in (400, 422)
    response = client.post(
        "/ml/predict", files={"image": ("d.png", digit)}, data={"ckpt_path": "/etc/passwd"}
    )
    assert response.status_code == 422
    assert "unknown field(s): ckpt_path" in response.json()["error"]
    response = client.post("/ml/predict", files={"image": ("d.png", digit)}, data={"run": "../x"})
    assert response.status_code == 422
    response = client.post("/ml/predict", data={"model": "cnn_mnist"})
    assert response.status_code == 422
    assert "missing field 'image'" in response.json()["error"]


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_auth_when_api_key_is_set(make_client) -> None:
    client = make_client(api_key="s3cret")
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200  # the UI shell asks for the token itself
    for method, path in (
        ("get", "/ml/models"),
        ("get", "/ml/jobs"),
        ("post", "/ml/train"),
        ("post", "/ml/predict"),
        ("get", "/llm/models"),
        ("post", "/llm/generate"),
        ("delete", "/ml/jobs/x"),
    ):
        response = client.request(method, path)
        assert response.status_code == 401, path
        assert "bearer token" in response.json()["error"]
        response = client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401
    ok = client.get("/ml/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_no_auth_by_default(make_client) -> None:
    assert make_client().get("/ml/models").status_code == 200


def test_api_key_from_the_environment(tmp_path, monkeypatch) -> None:
    from ml_engine.server.settings import load_settings
    from tests.server.conftest import serve_config

    monkeypatch.setenv("ML_ENGINE_API_KEY", "from-env")
    assert load_settings(serve_config(tmp_path)).api_key == "from-env"
    monkeypatch.delenv("ML_ENGINE_API_KEY")
    assert load_settings(serve_config(tmp_path)).api_key is None


def test_ui_page(make_client) -> None:
    client = make_client()
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../../../etc/passwd").status_code == 404
