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
