"""Embeddings, tokens and token log-probabilities on a loaded llama.cpp model.

Everything here runs where the model is loaded (the server's model worker) and works on a
``LlamaCppBackend``'s own llama context:

* ``embed``: mean pooling of the last hidden states (after the output norm, before the output
  head) over every token of the input, L2-normalized. The generation context is switched to
  embeddings output (``llama_set_embeddings``) for the call and back afterwards, rather than a
  second context with llama.cpp's own ``pooling_type=mean``: a second context holds its own KV
  cache and compute buffers for ``n_ctx`` (+5.3 MiB RSS for the 256-wide 2-layer test model at
  ``n_ctx`` 2048, about 0.5 GiB for an 8B model at 4096), for the same vector.
* ``tokenize`` / ``detokenize``: llama-server's ``/tokenize`` and ``/detokenize`` with an exact
  round trip (the SentencePiece space prefix llama.cpp adds is taken off again).
* ``logprob_picker``: wraps a token picker so that each picked token's log-probability and the
  ``k`` most likely alternatives are recorded, from the logits the sampler read.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ml_engine.errors import UserError

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


def n_embd(backend: Any) -> int:
    return int(backend._lib.llama_model_n_embd(backend._model))


def check_tokens(backend: Any, tokens: Sequence[int], what: str) -> None:
    """Token ids the model has: llama.cpp would read past its tables on any other."""
    bad = next((t for t in tokens if not 0 <= int(t) < backend.n_vocab), None)
    if bad is not None:
        raise UserError(f"{what}: token id {bad} is not in the vocabulary [0, {backend.n_vocab})")


def embed(backend: Any, inputs: Sequence[str | Sequence[int]], limit: int) -> dict[str, Any]:
    """Unit-length mean-pooled vectors of ``inputs`` (texts, tokenized with the model's BOS
    as llama-server does, or token-id lists taken as given), with their token counts."""
    token_lists: list[list[int]] = []
    for index, item in enumerate(inputs):
        tokens = backend.tokenize(item) if isinstance(item, str) else [int(t) for t in item]
        where = f"input[{index}]"
        if not tokens or (isinstance(item, str) and not item):
            raise UserError(f"{where} is empty; give at least one character or token")
        check_tokens(backend, tokens, where)
        if len(tokens) > limit:
            raise UserError(
                f"{where} has {len(tokens)} tokens but the context holds {limit} "
                f"(n_ctx={limit}); shorten it or load the model with a larger n_ctx"
            )
        token_lists.append(tokens)
    lib, ctx = backend._lib, backend._ctx
    width = n_embd(backend)
    vectors = []
    lib.llama_set_embeddings(ctx, True)
    try:
        for tokens in token_lists:
            backend._clear_kv_cache()
            total = np.zeros(width, dtype=np.float64)
            for start in range(0, len(tokens), backend.n_batch):
                chunk = tokens[start : start + backend.n_batch]
                backend._decode(chunk, start, all_logits=True)  # an output at every position
                for i in range(len(chunk)):
                    pointer = lib.llama_get_embeddings_ith(ctx, i)
                    if not pointer:
                        raise RuntimeError("llama.cpp returned no embeddings for a position")
                    total += np.ctypeslib.as_array(pointer, shape=(width,))
            mean = total / len(tokens)
            norm = float(np.linalg.norm(mean))
            vectors.append((mean / norm if norm > 0 else mean).astype(np.float32))
    finally:
        lib.llama_set_embeddings(ctx, False)  # the context generates again
        backend._clear_kv_cache()
    return {"vectors": vectors, "tokens": [len(t) for t in token_lists], "n_embd": width}


# ---- tokens ----------------------------------------------------------------------------------


def piece(backend: Any, token: int, special: bool = True) -> bytes:
    """The bytes of one token; ``special``: control tokens (BOS ``<s>``) as their text."""
    buffer = ctypes.create_string_buffer(256)
    n = backend._lib.llama_token_to_piece(backend._vocab, token, buffer, 256, 0, special)
    if n < 0:  # longer than the buffer: -n is the size it needs
        buffer = ctypes.create_string_buffer(-n)
        n = backend._lib.llama_token_to_piece(backend._vocab, token, buffer, -n, 0, special)
    return buffer.raw[: max(n, 0)]


@functools.lru_cache(maxsize=8)
def _adds_space_prefix(backend: Any) -> bool:
    """Whether the tokenizer puts a space before a text (SentencePiece's ``▁``): then
    detokenizing drops it again, as SentencePiece's own decode does."""
    tokens = tokenize(backend, "a", add_special=False, parse_special=False)
    return b"".join(piece(backend, t) for t in tokens) == b" a"


def tokenize(backend: Any, content: str, add_special: bool, parse_special: bool) -> list[int]:
    data = content.encode("utf-8")
    capacity = len(data) + 8
    for _ in range(2):
        tokens = (backend._lib.llama_token * capacity)()
        n = backend._lib.llama_tokenize(
            backend._vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n >= 0:
            return list(tokens[:n])
        capacity = -n
    raise RuntimeError("llama_tokenize did not fit its own size")


def _is_control(backend: Any, token: int) -> bool:
    return bool(backend._lib.llama_vocab_is_control(backend._vocab, token))


def detokenize_bytes(backend: Any, tokens: Sequence[int]) -> bytes:
    """The bytes of ``tokens``, control tokens as their text (llama-server's way): the inverse
    of ``tokenize`` (the space prefix a SentencePiece tokenizer adds before the first text
    token, after any leading control tokens, is taken off)."""
    check_tokens(backend, tokens, "tokens")
    pieces = [piece(backend, t) for t in tokens]
    if _adds_space_prefix(backend):
        first = next((i for i, t in enumerate(tokens) if not _is_control(backend, t)), None)
        if first is not None and pieces[first].startswith(b" "):
            pieces[first] = pieces[first][1:]
    return b"".join(pieces)


def tokenize_reply(
    backend: Any, content: str, add_special: bool, parse_special: bool, with_pieces: bool
) -> dict[str, Any]:
    """llama-server's ``/tokenize`` reply: ids, or ``{"id", "piece"}`` with ``with_pieces``
    (the piece as text, or as its byte values where it is no whole UTF-8 text)."""
    tokens = tokenize(backend, content, add_special, parse_special)
    if not with_pieces:
        return {"tokens": tokens}
    out = []
    for token in tokens:
        raw = piece(backend, token)
        try:
            text: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = list(raw)
        out.append({"id": token, "piece": text})
    return {"tokens": out}


# ---- log-probabilities -----------------------------------------------------------------------


def _entry(backend: Any, token: int, logprob: float) -> dict[str, Any]:
    raw = piece(backend, token, special=False)
    return {
        "token": raw.decode("utf-8", errors="replace"),
        "bytes": list(raw),
        "logprob": float(logprob),
    }


def logprob_picker(
    backend: Any, pick: Callable[[], int], top: int, out: list[dict[str, Any]]
) -> Callable[[], int]:
    """``pick`` that also appends, per picked token, its log-probability and the ``top`` most
    likely tokens' to ``out``: the log-softmax of the model's logits at that position (the
    logits the sampler read; before temperature, top-p and penalties, as OpenAI reports them).
    """
    lib, ctx, n_vocab = backend._lib, backend._ctx, backend.n_vocab

    def picked() -> int:
        token = pick()
        pointer = lib.llama_get_logits_ith(ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argsort(-logprobs, kind="stable")[:top] if top else []
        entry = _entry(backend, token, logprobs[token])
        entry["top_logprobs"] = [_entry(backend, int(t), logprobs[t]) for t in best]
        out.append(entry)
        return token

    return picked
