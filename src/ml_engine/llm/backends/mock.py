"""MOCK backend: no model, a deterministic echo, for dry runs of sweeps and the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.backends.base import Generation, LlmBackend, Sampling


class MockBackend(LlmBackend):
    """MOCK: loads no model; the completion echoes the prompt's words, deterministically.

    For dry runs of sweeps and servers. Tokens are whitespace-separated words; its timings
    measure this echo, not a model.
    """

    name = "mock"

    def __init__(self) -> None:
        self.load_s = 0.0

    def _words(self, prompt: str, sampling: Sampling) -> tuple[list[str], list[str]]:
        if not prompt:
            raise UserError("the prompt is empty; expected at least one character")
        words = prompt.split() or [prompt]
        return words, words[: sampling.max_tokens]

    def generate(self, prompt: str, sampling: Sampling) -> Generation:
        clock = time.perf_counter
        t_start = clock()
        words, echoed = self._words(prompt, sampling)
        t_first = clock()
        text = " ".join(echoed)
        record = Generation(
            tokens=list(range(len(echoed))),
            prompt_tokens=len(words),
            finish_reason="stop" if len(echoed) == len(words) else "length",
            ttft_s=t_first - t_start,
            prompt_eval_s=t_first - t_start,
            text=text,
        )
        record.gen_s = clock() - t_first
        record.n_decoded = max(len(echoed) - 1, 0)
        return record

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        _, echoed = self._words(prompt, Sampling(**sampling))
        for index, word in enumerate(echoed):
            yield word if index == 0 else " " + word

    def close(self) -> None:
        """Nothing to release: the mock holds no model."""

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model_description": "mock echo backend (no model loaded)",
            "gpu_offload_supported": False,
            "n_gpu_layers_effective": 0,
            "compute_backend": "none (mock)",
            "offload_note": "mock backend: nothing runs on any device",
            "load_s": 0.0,
        }
