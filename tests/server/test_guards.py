"""Bounded work per client: JSON-only routes, Host/Origin checks without a key, queue caps,
pixel budgets."""

from __future__ import annotations

import pytest

JSON = {"content-type": "application/json"}


def _jobs(client) -> list[dict]:
    return client.get("/ml/jobs").json()["jobs"]


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_json_routes_refuse_other_content_types(make_client, content_type) -> None:
    client = make_client()
    headers = {"content-type": content_type} if content_type else {}
    for path, body in (
        ("/ml/train-all", b""),  # the cross-site "simple" POST that queued trainings
        ("/ml/train", b'{"model":"mlp_mnist","epochs":1}'),
        ("/llm/generate", b'{"backend":"mock","prompt":"hi"}'),
    ):
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == 415, (path, response.text)
        error = response.json()["error"]
        assert "Content-Type: application/json" in error and "\n" not in error
    assert _jobs(client) == []


def test_a_foreign_host_is_refused_without_a_key(make_client, tmp_path) -> None:
    client = make_client()
    for path in ("/ml/models", "/", "/health"):
        response = client.get(path, headers={"host": "evil.example"})
        assert response.status_code == 421, response.text
        assert response.json()["error"].startswith("Host 'evil.example' is not a name of this")
    response = client.post(
        "/ml/train-all", content=b"{}", headers={**JSON, "host": "evil.example:18080"}
    )
    assert response.status_code == 421 and _jobs(client) == []
    for host in ("127.0.0.1:18080", "localhost", "[::1]:18080", "LOCALHOST:1"):
        assert client.get("/ml/models", headers={"host": host}).status_code == 200, host
    # with a key the token decides: browsers never add it by themselves
    keyed = make_client(api_key="s3cret", jobs_db=str(tmp_path / "other.sqlite"))
    foreign = {"host": "evil.example", "origin": "http://evil.example"}
    assert keyed.get("/ml/models", headers=foreign).status_code == 401
    auth = {**foreign, "Authorization": "Bearer s3cret"}
    assert keyed.get("/ml/models", headers=auth).status_code == 200


def test_allowed_hosts_adds_names(make_client, tmp_path) -> None:
    client = make_client(allowed_hosts=["testserver", "box.lan"])
    assert client.get("/ml/models", headers={"host": "box.lan:18080"}).status_code == 200
    assert client.get("/ml/models", headers={"host": "evil.example"}).status_code == 421
    anything = make_client(allowed_hosts=["*"], jobs_db=str(tmp_path / "other.sqlite"))
    assert anything.get("/ml/models", headers={"host": "evil.example"}).status_code == 200


def test_a_foreign_origin_is_refused_without_a_key(make_client, tmp_path) -> None:
    client = make_client()
    host = {"host": "127.0.0.1:18080"}
    for origin in ("http://evil.example", "null", "http://127.0.0.1:3000", "file://"):
        response = client.post(
            "/ml/train-all", content=b"{}", headers={**JSON, **host, "origin": origin}
        )
        assert response.status_code == 403, (origin, response.text)
        assert "allowed_origins" in response.json()["error"]
    assert _jobs(client) == []
    # the server's own page, and an origin the operator allows
    same = client.get("/ml/models", headers={**host, "origin": "http://127.0.0.1:18080"})
    assert same.status_code == 200
    allowed = make_client(
        allowed_origins=["http://dash.lan:8000"], jobs_db=str(tmp_path / "other.sqlite")
    )
    ok = allowed.get("/ml/models", headers={"origin": "http://dash.lan:8000"})
    assert ok.status_code == 200


def _idle_client(tmp_path, name: str, address: str = "10.0.0.1", **values):
    """A client of an app whose job runner is not started: every job it queues stays queued."""
    from fastapi.testclient import TestClient

    from ml_engine.server import create_app
    from tests.server.conftest import serve_config

    cfg = serve_config(tmp_path / name, **values)
    return TestClient(create_app(cfg), client=(address, 50000))


def test_queued_jobs_are_capped_per_client_and_per_server(tmp_path) -> None:
    caps = {"jobs.max_queued": 5, "jobs.max_queued_per_key": 3, "jobs.retry_after_s": 7}
    caps["train.models"] = ["cnn_mnist", "mlp_mnist"]  # train-all: two jobs
    first = _idle_client(tmp_path, "a", "10.0.0.1", **caps)
    body = {"model": "mlp_mnist", "epochs": 1}
    try:
        for _ in range(3):
            assert first.post("/ml/train", json=body).status_code == 202
        refused = first.post("/ml/train", json=body)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
        assert refused.json() == {
            "error": "3 training jobs are queued for this client address and 1 more would pass "
            "the limit of 3 (jobs.max_queued_per_key); retry when some have started"
        }
        # train-all queues all of its jobs or none
        assert first.post("/ml/train-all", json={"epochs": 1}).status_code == 429
        # another address has its own share, until the server's cap
        second = _from_address(first, "10.0.0.2")
        assert second.post("/ml/train-all", json={"epochs": 1}).status_code == 202
        full = second.post("/ml/train", json=body)
        assert full.status_code == 429 and "(jobs.max_queued)" in full.json()["error"]
        queued = first.get("/ml/jobs", params={"status": "queued"}).json()["jobs"]
        assert len(queued) == 5
        # a cancelled job frees its place
        first.delete(f"/ml/jobs/{queued[-1]['id']}")
        assert first.post("/ml/train", json=body).status_code == 202
    finally:
        first.app.state.server.store.close()


def test_with_a_key_the_cap_is_per_key(tmp_path) -> None:
    client = _idle_client(tmp_path, "k", **{"api_key": "s3cret", "jobs.max_queued_per_key": 1})
    auth = {"Authorization": "Bearer s3cret"}
    try:
        body = {"model": "mlp_mnist", "epochs": 1}
        assert client.post("/ml/train", json=body, headers=auth).status_code == 202
        again = _from_address(client, "10.9.9.9").post("/ml/train", json=body, headers=auth)
        assert again.status_code == 429 and "for this API key" in again.json()["error"]
    finally:
        client.app.state.server.store.close()


def _from_address(client, address: str):
    """A second client of the same app, from another address."""
    from fastapi.testclient import TestClient

    return TestClient(client.app, client=(address, 50000))


def _encoded(side: int, fmt: str) -> bytes:
    import io

    from PIL import Image, ImageDraw

    image = Image.new("L", (side, side), 255)
    ImageDraw.Draw(image).line([(side // 2, side // 5), (side // 2, 4 * side // 5)], 0, side // 12)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_predict_has_a_total_pixel_budget(make_client) -> None:
    client = make_client(**{"limits.max_total_pixels": 3_000_000})
    big = _encoded(1000, "PNG")  # 1 MP each, every one within the side limit
    files = [("image", (f"{i}.png", big, "image/png")) for i in range(4)]
    response = client.post("/ml/predict", files=files)
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": "4 image(s) hold 4000000 pixels; allowed: at most 3000000 pixels per request "
        "(limits.max_total_pixels)"
    }


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_are_decoded_reduced(fmt) -> None:
    import io

    from PIL import Image

    from ml_engine.training.vision.images import REDUCED_SIDE, load_reduced, to_mnist_digit

    data = _encoded(4096, fmt)
    with Image.open(io.BytesIO(data)) as image:
        reduced = load_reduced(image)
        assert REDUCED_SIDE <= max(reduced.size) < 2 * REDUCED_SIDE, reduced.size
        digit = to_mnist_digit(reduced)
    with Image.open(io.BytesIO(_encoded(256, fmt))) as small:
        expected = to_mnist_digit(load_reduced(small))
    # the same stroke read from 4096 px or from 256 px is the same digit
    assert abs(digit.astype(int) - expected.astype(int)).mean() < 8


def test_the_server_removes_partial_files_of_dead_writers_under_models_dir(
    make_client, tmp_path
) -> None:
    models = tmp_path / "models"
    left = models / "tiny" / f".tiny-q4_k_m.gguf.{2**22 + 7}.partial"  # no process has that pid
    left.parent.mkdir(parents=True)
    left.write_bytes(b"\0" * 4096)
    kept = models / "tiny" / "tiny-q4_k_m.gguf"
    kept.write_bytes(b"GGUF")
    make_client(**{"paths.models_dir": str(models)})
    assert not left.exists() and kept.read_bytes() == b"GGUF"
