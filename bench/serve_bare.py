"""The baseline of bench/serve_load.py: a bare FastAPI app with the route shapes of ours.

    python bench/serve_bare.py PORT

``POST /llm/generate`` echoes a JSON body as the mock backend answers; ``POST /ml/predict``
reads a multipart upload and decodes its PNG (no model work); ``POST /v1/chat/completions`` and
``POST /v1/embeddings`` read the JSON body and answer a fixed reply of OpenAI's shape (a chat
completion whose content is a JSON object, one unit vector); ``/health`` for readiness. No
middleware, guards or dependencies: what FastAPI and uvicorn cost by themselves, measured in
the same run as ours, so their ratio says what our layers add."""

from __future__ import annotations

import io
import json
import sys
import time
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel

app = FastAPI()


class Generate(BaseModel):
    backend: str
    model: str
    prompt: str
    max_tokens: int


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/llm/generate")
async def generate(body: Generate) -> dict[str, Any]:
    words = body.prompt.split()[: body.max_tokens]
    return {"model": body.model, "prompt": body.prompt, "output": " ".join(words)}


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


@app.post("/ml/predict")
async def predict(request: Request) -> dict[str, Any]:
    form = await request.form()
    pixels = await run_in_threadpool(_decode, await form["image"].read())
    return {"predictions": [{"name": form["image"].filename, "mean": float(pixels.mean())}]}


@app.post("/v1/chat/completions")
async def chat_completions(body: dict[str, Any]) -> dict[str, Any]:
    content = json.dumps({"raining": False, "mood": "calm"})
    message = {"role": "assistant", "content": content, "refusal": None}
    return {
        "id": "chatcmpl-bare",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16},
    }


EMBEDDING = [1.0 / 16.0] * 256  # a unit vector as wide as the tiny GGUF's


@app.post("/v1/embeddings")
async def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    data = [{"object": "embedding", "index": 0, "embedding": EMBEDDING}]
    usage = {"prompt_tokens": 5, "total_tokens": 5}
    return {"object": "list", "data": data, "model": body.get("model"), "usage": usage}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
