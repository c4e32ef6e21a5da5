"""What ``/v1`` replies carry beside OpenAI's own fields: llama-server's ``timings``, and the
worker's per-token log-probabilities in OpenAI's two shapes (chat and legacy completions)."""

from __future__ import annotations

from typing import Any


def _rate(n: int, ms: float) -> tuple[float | None, float | None]:
    """(ms per token, tokens per second); None where there is nothing to divide (JSON has
    no NaN)."""
    if n <= 0 or ms <= 0:
        return None, None
    return ms / n, 1000.0 * n / ms


def timings(prompt_n: int, prompt_ms: float, predicted_n: int, predicted_ms: float) -> dict:
    """llama-server's ``timings`` object: the prompt's evaluation and the generation, each as
    a token count, milliseconds, ms per token and tokens per second."""
    prompt_per_token, prompt_per_second = _rate(prompt_n, prompt_ms)
    predicted_per_token, predicted_per_second = _rate(predicted_n, predicted_ms)
    return {
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_per_token,
        "prompt_per_second": prompt_per_second,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_per_token,
        "predicted_per_second": predicted_per_second,
    }


def generation_timings(prompt_n: int, completion_n: int, worker: dict[str, Any]) -> dict:
    """``timings`` from a worker's generation timings (seconds): the prompt is its
    evaluation, the generation runs from the end of the prompt to the last token (the first
    token's sampling included, so ``predicted_n`` is every completion token)."""
    prompt_s = float(worker.get("prompt_eval_s") or 0.0)
    ttft_s = float(worker.get("ttft_s") or 0.0)
    gen_s = float(worker.get("gen_s") or 0.0)
    predicted_s = max(0.0, ttft_s - prompt_s) + gen_s if completion_n else 0.0
    return timings(prompt_n, prompt_s * 1000, completion_n, predicted_s * 1000)


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat ``choices[].logprobs``: ``{"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}], "refusal": null}``."""
    return {"content": [dict(entry) for entry in entries], "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (one
    ``{token: logprob}`` per position) and ``text_offset`` (each token's start, in characters
    of the completion text, from ``offset``)."""
    offsets, at = [], offset
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [_top_dict(entry) for entry in entries],
        "text_offset": offsets,
    }


def _top_dict(entry: dict[str, Any]) -> dict[str, float]:
    """``{token: logprob}``, most likely first; tokens whose text is the same (byte tokens
    that are no whole character all read "\ufffd") keep the likelier one's value."""
    top: dict[str, float] = {}
    for alternative in entry.get("top_logprobs", []):
        top.setdefault(alternative["token"], alternative["logprob"])
    return top
