"""Issue 23, what a fault-and-abuse run found: forwarded addresses believed from anyone, Host
look-alikes answered, the API key written into the run dir, client-chosen metric labels."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ml_engine.errors import UserError
from ml_engine.server import create_app
from ml_engine.server.settings import Settings, load_settings, uvicorn_options
from tests.server.conftest import free_port, live_server, serve_config, serve_py

JSON = {"content-type": "application/json"}
TRAIN = {"model": "mlp_mnist", "epochs": 1}


@contextmanager
def serving_as_serve_py(settings: Settings) -> Iterator[str]:
    """uvicorn with the options ``serve.py`` gives it, without the app's lifespan: the job
    runner never starts, so every job a request queues stays queued and no training runs."""
    with live_server(create_app(settings), lifespan="off", **uvicorn_options(settings)) as url:
        yield url


def _train_from(base: str, forwarded_for: str) -> httpx.Response:
    headers = {**JSON, "X-Forwarded-For": forwarded_for}
    return httpx.post(f"{base}/ml/train", json=TRAIN, headers=headers, timeout=30)


def _settings(tmp_path: Path, **values) -> Settings:
    values = {"port": free_port(), "log_level": "warning", **values}
    return load_settings(serve_config(tmp_path, **values))


def test_forwarded_for_cannot_buy_a_fresh_job_share(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "direct", **{"jobs.max_queued_per_key": 2})
    with serving_as_serve_py(settings) as base:
        answers = [_train_from(base, f"198.51.100.{n}") for n in range(6)]
    assert [a.status_code for a in answers] == [202, 202, 429, 429, 429, 429]
    assert "for this client address" in answers[-1].json()["error"]
    assert settings.forwarded_allow_ips == ()  # the default: no proxy is believed


def test_a_configured_proxy_is_believed(tmp_path: Path) -> None:
    values = {"jobs.max_queued_per_key": 2, "forwarded_allow_ips": ["127.0.0.1"]}
    with serving_as_serve_py(_settings(tmp_path, **values)) as base:
        clients = [_train_from(base, f"198.51.100.{n}").status_code for n in range(4)]
        same = [_train_from(base, "203.0.113.7").status_code for _ in range(3)]
    assert clients == [202] * 4  # each address behind the proxy has its own share
    assert same == [202, 202, 429]


@pytest.mark.parametrize(
    ("entry", "accepted"),
    [("proxy.lan", "IP addresses or networks"), ("10.0.0.0/33", "IP addresses or networks")],
)
def test_forwarded_allow_ips_takes_addresses_only(tmp_path: Path, entry, accepted) -> None:
    with pytest.raises(UserError) as refused:
        _settings(tmp_path, forwarded_allow_ips=[entry])
    assert str(refused.value).startswith(f"forwarded_allow_ips entry '{entry}' is not valid")
    assert accepted in str(refused.value) and "\n" not in str(refused.value)


LOOKALIKES = [
    "[::1].evil.example",
    "[::1]evil",
    "[::1]:80evil",
    "[::1]:18080.evil.example",
    "[::1]@evil.example",
    "[::1",
    "::1",
    "localhost.evil.example",
    "localhost:80:80",
    "127.0.0.1.evil.example",
    "127.0.0.1@evil.example",
    "evil.example#127.0.0.1",
    "[::ffff:127.0.0.2]",
    "[::1%25lo]",
]
LOOPBACK = ["[::1]", "[::1]:18080", "[0:0:0:0:0:0:0:1]:80", "127.0.0.1", "LOCALHOST:1"]


def test_host_lookalikes_are_refused(tmp_path: Path) -> None:
    with live_server(create_app(serve_config(tmp_path))) as base, httpx.Client() as client:
        for host in LOOKALIKES:
            response = client.get(f"{base}/health", headers={"host": host})
            assert response.status_code == 421, (host, response.text)
            error = response.json()["error"]
            assert error.startswith(f"Host '{host}' is not a name of this server; call it by")
            assert "\n" not in error
        for host in LOOPBACK:
            assert client.get(f"{base}/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_takes_host_names_only(tmp_path: Path) -> None:
    with pytest.raises(UserError) as refused:
        load_settings(serve_config(tmp_path, allowed_hosts=["box.lan", "[::1]evil"]))
    assert str(refused.value).startswith("allowed_hosts entry '[::1]evil' is not a host name;")
    names = ["box.lan:8080", "fe80::1", "[fe80::2]"]
    with live_server(create_app(serve_config(tmp_path, allowed_hosts=names))) as base:
        for host, status in (("box.lan", 200), ("[fe80::1]:80", 200), ("[fe80::2]", 200)):
            assert httpx.get(f"{base}/health", headers={"host": host}).status_code == status
        assert httpx.get(f"{base}/health", headers={"host": "box.lan.evil"}).status_code == 421


KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}


def _label_values(text: str, name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_clients_cannot_grow_the_metric_labels(tmp_path: Path) -> None:
    app = create_app(serve_config(tmp_path, api_key="sesame"))
    auth = {"Authorization": "Bearer sesame"}
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        for n in range(40):  # clients without the key, as in the abuse run
            client.request(f"AUDIT{n}", "/health")
            client.request(f"MKCOL{n}", f"/ml/jobs/made-up-{n}")
            client.get(f"/made-up-{n}/x")
            client.get(f"/static/made-up-{n}.js")
            client.get(f"/ml/jobs/made-up-{n}")
        scrape = client.get("/metrics", headers=auth)
    assert scrape.status_code == 200, scrape.text
    assert "made-up" not in scrape.text and "AUDIT" not in scrape.text
    labels = _label_values(scrape.text, "ml_engine_http_requests_total")
    assert {sample["method"] for sample in labels} <= KNOWN_METHODS | {"other"}
    routes = {"/health", "/ml/jobs/{job_id}", "/static/{path:path}", "unmatched"}
    assert {sample["route"] for sample in labels} <= routes
    other = {(s["route"], s["status"]) for s in labels if s["method"] == "other"}
    assert other == {("/health", "405"), ("/ml/jobs/{job_id}", "405")}, other
    # 200 requests with 160 made-up words in them: a handful of series, each of fixed words
    assert len(labels) <= 8, labels


def _serve_py(tmp_path: Path, key_argument: list[str], env: dict[str, str]) -> str:
    """Run ``serve.py`` as a user does until it answers, make a few requests, stop it with
    Ctrl-C; returns its output."""
    with serve_py(tmp_path, *key_argument, env=env, log_level="info") as served:
        assert httpx.get(f"{served.url}/ml/jobs").status_code == 401
        spoofed = {"Authorization": f"Bearer {SECRET}", "X-Forwarded-For": "203.0.113.99"}
        assert httpx.get(f"{served.url}/ml/jobs", headers=spoofed).status_code == 200
    assert served.process.returncode == 0, served.output
    return served.output


SECRET = "k3y-that-must-stay-in-memory-4f1c"


@pytest.mark.slow
@pytest.mark.parametrize("given_by", ["environment", "command line"])
def test_serve_py_writes_no_secret_into_its_run_dir(tmp_path: Path, given_by: str) -> None:
    if given_by == "environment":
        output = _serve_py(tmp_path, [], {"ML_ENGINE_API_KEY": SECRET})
    else:
        output = _serve_py(tmp_path, [f"api_key={SECRET}"], {"ML_ENGINE_API_KEY": ""})
    (run_dir,) = (tmp_path / "serve" / "runs").iterdir()
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert run_dir / "config_resolved.yaml" in files and run_dir / "job.json" in files
    holding = [path for path in files if SECRET.encode() in path.read_bytes()]
    assert holding == [], f"the API key was written into {holding}"
    assert "api_key: '***'" in (run_dir / "config_resolved.yaml").read_text()
    # serve.py's uvicorn believes no forwarded address: the access log names the real client
    assert "203.0.113.99" not in output
    assert re.search(r'127\.0\.0\.1:\d+ - "GET /ml/jobs HTTP/1\.1" 200', output), output
