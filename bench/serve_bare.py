"""The baseline of bench/serve_load.py: a bare FastAPI app with the route shapes of ours.

    python bench/serve_bare.py PORT

``POST /llm/generate`` echoes a JSON body as the mock backend answers; ``POST /ml/predict``
reads a multipart upload and decodes its PNG (no model work); ``/health`` for readiness. No
middleware, guards or dependencies: what FastAPI and uvicorn cost by themselves, measured in
the same run as ours, so their ratio says what our layers add."""

from __future__ import annotations

import io
import sys
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


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
