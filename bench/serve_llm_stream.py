"""Streamed tokens/s through the server (a model worker, SSE over loopback) vs the same
generation in-process: what the crash isolation costs a streaming client.

    python bench/serve_llm_stream.py                     # the embedded tiny model, 256 tokens
    python bench/serve_llm_stream.py --tokens 512 --repeats 5
    python bench/serve_llm_stream.py --large     # tiny.yaml's ≈111M-parameter shape

Both sides run the same greedy generation of ``--tokens`` tokens on the same file; the rate is
pieces after the first / seconds from the first piece to the last (the generation phase, as a
client sees it). The server runs in this process (uvicorn in a thread), its model in a worker,
and the client in a process of its own, as a real client is (in this process it would take the
server's GIL for its own parsing of every event). Prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]


# tiny.yaml's shape for benchmarks (≈111M parameters)
LARGE = {"n_vocab": 4096, "n_embd": 1024, "n_ff": 2816, "n_layer": 8, "n_head": 16}
LARGE |= {"n_head_kv": 16}


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def in_process(path: Path, prompt: str, sampling: dict, n_ctx: int) -> float:
    from ml_engine.llm.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(path, n_ctx=n_ctx, ignore_eos=True)
    try:
        stamps = [time.perf_counter() for _ in backend.stream(prompt, **sampling)]
    finally:
        backend.close()
    return rate(stamps)


def streamed_rate(url: str, body: dict) -> float:
    stamps = []
    with (
        httpx.Client(base_url=url, timeout=300) as http,
        http.stream("POST", "/llm/generate", json=body) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("event: token"):
                stamps.append(time.perf_counter())
    return rate(stamps)


def through_server(url: str, body: dict) -> float:
    """One streamed generation read by a client process of its own."""
    done = subprocess.run(
        [sys.executable, __file__, "--client", url, json.dumps(body)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large", action="store_true", help="tiny.yaml's benchmark shape")
    parser.add_argument("--client", nargs=2, metavar=("URL", "BODY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:  # the client process: print the rate it saw
        print(streamed_rate(args.client[0], json.loads(args.client[1])))
        return

    from ml_engine.llm.models import ensure_model_file
    from ml_engine.server import create_app
    from ml_engine.server.llm_service import compose_config
    from tests.server.conftest import live_server, serve_config

    sampling = {"max_tokens": args.tokens, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    sampling |= {"repeat_penalty": 1.0, "seed": 1}
    prompt, n_ctx = "Once upon a time", 2048
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        shape = LARGE if args.large else {}
        overrides = [f"llm.model.shape.{k}={v}" for k, v in shape.items()]
        llm = compose_config("generate", ["llm/model=tiny", *overrides]).llm
        path = ensure_model_file(llm.model, str(llm.quantization), models).path
        # the same file served as an export of a training run (named by its file stem)
        export = Path(tmp) / "runs" / "bench" / "bench-model.gguf"
        export.parent.mkdir(parents=True)
        shutil.copyfile(path, export)
        app = create_app(serve_config(Path(tmp), **{"paths.models_dir": str(models)}))
        body = {
            "model": "bench-model",
            "prompt": prompt,
            "stream": True,
            "n_ctx": n_ctx,
            **sampling,
        }
        served, direct = [], []
        with live_server(app) as url:
            through_server(url, body)  # load the worker, warm up
            in_process(path, prompt, sampling, n_ctx)
            for _ in range(args.repeats):  # interleaved: a busy machine slows both alike
                served.append(through_server(url, body))
                direct.append(in_process(path, prompt, sampling, n_ctx))
    served_rate, direct_rate = statistics.median(served), statistics.median(direct)
    print(f"model: {path.name}, {args.tokens} tokens, {args.repeats} repeats, medians")
    print(f"in-process stream:      {direct_rate:9.1f} tokens/s")
    print(f"server (worker + SSE):  {served_rate:9.1f} tokens/s")
    print(f"ratio server/in-process: {served_rate / direct_rate:.3f}")


if __name__ == "__main__":
    main()
