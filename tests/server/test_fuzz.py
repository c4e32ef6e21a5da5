"""Fuzz of the API: property-based from its own OpenAPI schema (schemathesis) on loopback, and
hand-made hostile bodies for every route and field (lone surrogates, wrong types, files where
text belongs and text where files do). No request may produce a 5xx, every refusal is one line
of JSON, and no reply shows a server object's repr."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from ml_engine.server import create_app
from ml_engine.server.routes_ml import FORM_FIELDS
from ml_engine.server.schemas import GenerateRequest, PredictJson, TrainOptions, TrainRequest
from tests.server.conftest import live_server, serve_config

# what a leaked Python repr looks like: "<_io.BytesIO object at 0x7f…>", "UploadFile(filename=…"
REPR = re.compile(r"object at 0x|UploadFile\(|Headers\(|FormData\(|<[\w.]+ object")

# cheap jobs: the fuzzer queues many trainings; each runs a single batch at most
FUZZ_JOB_OVERRIDES = [
    "++trainer.limit_train_batches=1",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "++trainer.max_epochs=1",
]

STATUSES: list[tuple[str, int]] = []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, trained_runs: Path) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    runs = tmp_path / "runs"
    shutil.copytree(trained_runs, runs)  # the jobs the fuzzer queues train here, not there
    cfg = serve_config(
        tmp_path,
        runs_dir=runs,
        **{"paths.models_dir": str(tmp_path / "models"), "limits.max_body_bytes": 262144},
    )
    cfg.jobs.extra_overrides = [*cfg.jobs.extra_overrides, *FUZZ_JOB_OVERRIDES]
    with live_server(create_app(cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_makes_a_server_error(case, fuzz_server: str) -> None:
    response = case.call(base_url=fuzz_server, timeout=60)
    STATUSES.append((f"{case.method} {case.path}", response.status_code))
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        if case.path.startswith("/v1/"):  # the OpenAI-compatible API: OpenAI's error shape
            assert isinstance(error["message"], str) and "type" in error
        else:
            assert isinstance(error, str)
        assert not REPR.search(response.text), response.text[:500]


@pytest.mark.slow
def test_server_alive_after_fuzzing(fuzz_server: str) -> None:
    counts: dict[tuple[str, int], int] = {}
    for key in STATUSES:
        counts[key] = counts.get(key, 0) + 1
    print("fuzz responses:", sorted(counts.items()))
    assert len(STATUSES) > 50, "the fuzzer sent too few requests to mean anything"
    assert all(code < 500 for _, code in STATUSES)
    assert any(400 <= code < 500 for _, code in STATUSES)
    response = httpx.get(f"{fuzz_server}/health", timeout=10)
    assert response.json() == {"service": "ml-engine", "status": "ok"}
    with httpx.Client(base_url=fuzz_server, timeout=60) as client:
        for job in client.get("/ml/jobs", params={"limit": 1000}).json()["jobs"]:
            if job["status"] in ("queued", "running"):
                client.delete(f"/ml/jobs/{job['id']}")


# ---- hand-made hostile requests ---------------------------------------------------------------

# a valid body per JSON route, and the model whose fields each one takes
JSON_ROUTES: dict[str, tuple[dict[str, Any], type]] = {
    "/ml/train": ({"model": "cnn_mnist"}, TrainRequest),
    "/ml/train-all": ({}, TrainOptions),
    "/ml/predict": ({"images": [[[0] * 28] * 28]}, PredictJson),
    "/llm/generate": ({"backend": "mock", "model": "tiny", "prompt": "hi"}, GenerateRequest),
}
# raw JSON texts of hostile values: a lone surrogate (alone and inside text), wrong types
HOSTILE_VALUES = [
    '"\\ud800"',
    '"a\\udfffb"',
    '["\\ud800"]',
    '{"\\ud800": 1}',
    "[]",
    "{}",
    "null",
    "true",
    "-1",
    "1e400",
    '"' + "x" * 5000 + '"',
    '"../../etc/passwd"',
]


def _assert_plain_refusal(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert not REPR.search(response.text), response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error, str) and "\n" not in error, error


@pytest.fixture
def fuzz_client(make_client, tmp_path: Path):
    # no network is trainable: a hostile body that passes every check queues nothing
    return make_client(**{"train.models": [], "paths.models_dir": str(tmp_path / "models")})


def test_every_route_refuses_hostile_values_plainly(fuzz_client) -> None:
    headers = {"content-type": "application/json"}
    for path, (base, model) in JSON_ROUTES.items():
        for field in model.model_fields:
            for value in HOSTILE_VALUES:
                body = json.dumps(base)[:-1] + ("," if base else "") + f'"{field}": {value}}}'
                response = fuzz_client.post(path, content=body.encode(), headers=headers)
                _assert_plain_refusal(response)
        # a lone surrogate in a field name, and bodies that are no JSON object at all
        for body in ('{"\\ud800": 1}', '"\\ud800"', b'{"model": "\xff"}', "[" * 5000, "{", ""):
            raw = body if isinstance(body, bytes) else body.encode()
            _assert_plain_refusal(fuzz_client.post(path, content=raw, headers=headers))
    for url in (
        "/ml/jobs?status=%ED%A0%80",
        "/ml/jobs?limit=abc",
        "/ml/jobs?limit=99999999999999999999",
        "/ml/jobs/%ED%A0%80",
        "/ml/jobs/" + "x" * 5000,
    ):
        _assert_plain_refusal(fuzz_client.get(url))
        _assert_plain_refusal(fuzz_client.delete(url))


def test_a_lone_surrogate_is_a_422_naming_the_field(fuzz_client) -> None:
    headers = {"content-type": "application/json"}
    for path, body in (
        ("/ml/train", b'{"model":"\\ud800"}'),
        ("/llm/generate", b'{"model":"\\ud800","prompt":"x"}'),
        ("/llm/generate", b'{"model":"tiny","prompt":"a\\ud800"}'),
    ):
        response = fuzz_client.post(path, content=body, headers=headers)
        assert response.status_code == 422, response.text
        assert "holds a lone surrogate (U+D800)" in response.json()["error"]


def test_multipart_fields_of_the_wrong_kind_are_named_not_shown(fuzz_client) -> None:
    png = ("d.png", b"\x89PNG\r\n\x1a\n", "image/png")
    for field in FORM_FIELDS:
        # the field sent as a file, then as text, beside a (bad) image
        as_file = {field: ("x.bin", b"data", "application/octet-stream")}
        if field != "image":
            as_file["image"] = png
        _assert_plain_refusal(fuzz_client.post("/ml/predict", files=as_file))
        # a text part (no filename) that is not UTF-8
        as_text = {field: (None, b"\xff\xfe text")}
        if field != "image":
            as_text["image"] = png
        _assert_plain_refusal(fuzz_client.post("/ml/predict", files=as_text))
    response = fuzz_client.post(
        "/ml/predict", files={"invert": ("a.png", b"xx", "image/png"), "image": png}
    )
    assert response.status_code == 422
    assert response.json()["error"] == "invert must be a text field, not a file"


def test_undecodable_images_are_named_not_shown() -> None:
    from ml_engine.errors import UserError
    from ml_engine.server.predict_service import decode_image
    from ml_engine.server.settings import Limits

    for data in (b"data", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff" + b"\0" * 64, b""):
        with pytest.raises(UserError) as refused:
            decode_image(data, "upload.png", Limits())
        message = str(refused.value)
        assert message.startswith("cannot read image 'upload.png'") and not REPR.search(message)
