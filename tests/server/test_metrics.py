"""GET /metrics: a Prometheus scrape whose counts move by exactly what the requests did."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ml_engine.server import create_app
from tests.server.conftest import serve_config


def scrape(client, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape: (name, sorted labels) → value."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def digit_png(bundled_digits) -> bytes:
    images, labels = bundled_digits
    buffer = io.BytesIO()
    Image.fromarray(images[int(np.flatnonzero(labels == 3)[0])]).save(buffer, format="PNG")
    return buffer.getvalue()


REQUESTS = "ml_engine_http_requests_total"
LATENCY_COUNT = "ml_engine_http_request_duration_seconds_count"
TOKENS = "ml_engine_llm_tokens_generated_total"
LOADS = "ml_engine_model_loads_total"


@pytest.mark.slow
def test_metrics_count_requests_tokens_and_loads(
    make_client, trained_runs: Path, tmp_path_factory, bundled_digits
) -> None:
    models = tmp_path_factory.mktemp("metrics-models")
    client = make_client(runs_dir=trained_runs, **{"paths.models_dir": str(models)})
    before = scrape(client)
    assert value(before, "ml_engine_training_jobs", status="queued") == 0
    assert value(before, LOADS, kind="predict_checkpoint") == 0

    mock = {"backend": "mock", "model": "tiny", "prompt": "a b c d e f", "max_tokens": 4}
    for _ in range(3):
        assert client.post("/llm/generate", json=mock).status_code == 200
    tiny = {"backend": "llama_cpp", "model": "tiny", "prompt": "Hello", "max_tokens": 5}
    generated = client.post("/llm/generate", json=tiny).json()
    png = digit_png(bundled_digits)
    for _ in range(2):
        files = {"image": ("d.png", png, "image/png")}
        assert client.post("/ml/predict", files=files).status_code == 200
    assert client.get("/ml/jobs/no-such-job").status_code == 404
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    generate = {"route": "/llm/generate", "method": "POST"}
    assert moved(REQUESTS, **generate, status="200") == 4
    assert moved(LATENCY_COUNT, **generate) == 4
    assert moved(REQUESTS, route="/ml/predict", method="POST", status="200") == 2
    # the route template, never the raw path
    assert moved(REQUESTS, route="/ml/jobs/{job_id}", method="GET", status="404") == 1
    assert not any("no-such-job" in str(labels) for _, labels in after)
    # the first scrape itself, answered before the second began
    assert moved(REQUESTS, route="/metrics", method="GET", status="200") == 1
    assert moved(TOKENS, backend="mock") == 3 * 4
    assert moved(TOKENS, backend="llama_cpp") == generated["completion_tokens"] > 0
    assert moved("ml_engine_llm_generation_tokens_per_second_count", backend="llama_cpp") == 1
    assert moved(LOADS, kind="llm_worker") == 1
    assert moved(LOADS, kind="predict_checkpoint") == 1  # loaded once, then cached
    assert value(after, "ml_engine_llm_worker_crashes_total") == 0


def test_metrics_count_training_jobs_from_the_store(tmp_path: Path) -> None:
    # not started (no lifespan): no runner takes the jobs, they stay as the test sets them
    app = create_app(serve_config(tmp_path))
    client = TestClient(app)
    ids = [client.post("/ml/train", json={"model": "cnn_mnist"}).json()["id"] for _ in range(3)]
    store = app.state.server.store
    assert store.transition(ids[0], ("queued",), status="running")
    samples = scrape(client)
    assert value(samples, "ml_engine_training_jobs", status="queued") == 2
    assert value(samples, "ml_engine_training_jobs", status="running") == 1
    store.close()


def test_metrics_need_the_bearer_key_when_one_is_set(make_client) -> None:
    client = make_client(api_key="sesame")
    refused = client.get("/metrics")
    assert refused.status_code == 401 and "bearer" in refused.json()["error"]
    scrape(client, headers={"Authorization": "Bearer sesame"})


def test_apps_in_one_process_count_separately(make_client, tmp_path: Path) -> None:
    first, second = make_client(), make_client(jobs_db=str(tmp_path / "second.sqlite"))
    first.get("/health")
    health = {"route": "/health", "method": "GET", "status": "200"}
    assert value(scrape(first), REQUESTS, **health) == 1
    assert value(scrape(second), REQUESTS, **health) == 0


@pytest.mark.parametrize("window_ms", [0, 50])
def test_concurrent_predicts_get_their_own_answers(
    make_client, trained_runs: Path, bundled_digits, window_ms: int, tmp_path: Path
) -> None:
    """Batched across requests (a window long enough that they meet) or not, each request
    gets the answer a request alone gets."""
    import concurrent.futures

    images, labels = bundled_digits
    pngs = []
    for digit in range(8):
        buffer = io.BytesIO()
        Image.fromarray(images[int(np.flatnonzero(labels == digit)[-1])]).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    alone = make_client(runs_dir=trained_runs, **{"predict.batch_window_ms": 0})
    expected = [
        alone.post("/ml/predict", files={"image": ("d.png", p)}).json()["predictions"][0]
        for p in pngs
    ]
    second_db = str(tmp_path / "batched.sqlite")
    client = make_client(
        runs_dir=trained_runs, jobs_db=second_db, **{"predict.batch_window_ms": window_ms}
    )
    client.post("/ml/predict", files={"image": ("d.png", pngs[0])})  # loads the checkpoint
    batcher = client.app.state.server.predictor.batcher
    passes = batcher.batches

    def ask(png: bytes) -> dict:
        return client.post("/ml/predict", files={"image": ("d.png", png)}).json()

    with concurrent.futures.ThreadPoolExecutor(len(pngs)) as pool:
        answers = list(pool.map(ask, pngs))
    for answer, want in zip(answers, expected, strict=True):
        got = answer["predictions"][0]
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    if window_ms:
        assert batcher.batches - passes < len(pngs)  # some requests shared a forward pass
    else:
        assert batcher.batches - passes == len(pngs)
