"""The model worker's embeddings and token ops (``llm_worker``'s protocol, beside generate).

``{"op": "embed", "input": [text or token ids, ...], "n_ctx"}`` → ``{"embeddings": [[float]],
"tokens": [int], "n_embd", "timings"}``; ``{"op": "tokenize", "content", "add_special",
"parse_special", "with_pieces"}`` → llama-server's ``{"tokens": [...]}``; ``{"op":
"detokenize", "tokens"}`` → ``{"content"}``. Each answers ``{"error", "user"}`` instead on a
bad input, as generation does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ml_engine.llm import embeddings


def embed(backend: Any, request: dict[str, Any]) -> dict[str, Any]:
    limit = min(backend.n_ctx, int(request.get("n_ctx") or backend.n_ctx))
    started = time.perf_counter()
    done = embeddings.embed(backend, request["input"], limit)
    return {
        # float32 values as Python floats: JSON carries them exactly (repr round-trips)
        "embeddings": [vector.tolist() for vector in done["vectors"]],
        "tokens": done["tokens"],
        "n_embd": done["n_embd"],
        "timings": {"prompt_eval_s": time.perf_counter() - started},
    }


def tokenize(backend: Any, request: dict[str, Any]) -> dict[str, Any]:
    return embeddings.tokenize_reply(
        backend,
        request["content"],
        bool(request.get("add_special")),
        bool(request.get("parse_special")),
        bool(request.get("with_pieces")),
    )


def detokenize(backend: Any, request: dict[str, Any]) -> dict[str, Any]:
    raw = embeddings.detokenize_bytes(backend, request["tokens"])
    # token lists that end inside a character (a byte token alone) become U+FFFD there
    return {"content": raw.decode("utf-8", errors="replace")}


OPS: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "embed": embed,
    "tokenize": tokenize,
    "detokenize": detokenize,
}
