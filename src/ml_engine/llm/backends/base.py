"""The contract every text-generation backend keeps: sampling settings in, a measured
generation out, text streamed as it is produced."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request; ``temperature <= 0`` means greedy."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repeat_penalty: float = 1.1
    seed: int | None = None


# the request keys a sampling setting is read from (config nodes, API bodies)
SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Sampling))

# what a model's chat_template=true did to the prompts (``describe()["chat_template"]``; "off"
# when not asked for): a result never claims a template that was not applied
CHAT_TEMPLATE_APPLIED = "applied"
CHAT_TEMPLATE_MISSING = "none in the file"
CHAT_TEMPLATE_UNKNOWN = "not supported by llama.cpp"


@dataclass
class Generation:
    """One completion with its clock readings (``perf_counter`` seconds) and llama.cpp counters.

    The generation phase runs from the first sampled token to the last; each of its
    ``n_decoded`` steps is one single-token decode plus sampling, which is also what llama.cpp's
    decode counters (``n_eval``, ``t_eval``) count.
    """

    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"
    load_s: float = 0.0
    prompt_eval_s: float = 0.0
    ttft_s: float = 0.0
    gen_s: float = 0.0
    n_decoded: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    text: str = ""
    # log-probabilities: None = not asked for; else the number of alternatives per token, and
    # one entry per generated token (``llm.embeddings.logprob_picker``)
    top_logprobs: int | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gen_tokens_per_s(self) -> float:
        return self.n_decoded / self.gen_s if self.gen_s > 0 and self.n_decoded else float("nan")

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_eval_s if self.prompt_eval_s > 0 else float("nan")

    def timings(self) -> dict[str, float]:
        return {
            "load_s": self.load_s,
            "prompt_eval_s": self.prompt_eval_s,
            "gen_s": self.gen_s,
            "ttft_s": self.ttft_s,
            "gen_tokens_per_s": self.gen_tokens_per_s,
        }

    def as_completion(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.tokens),
            "finish_reason": self.finish_reason,
            "timings": self.timings(),
        }


class LlmBackend(ABC):
    """What generation sweeps and the server need from a text generator."""

    name: str

    @abstractmethod
    def generate(self, prompt: str, sampling: Sampling) -> Generation:
        """One completion with its measurements."""

    @abstractmethod
    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield the completion's text as it is produced (pieces never split a character)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Model and runtime facts for result files (description, sizes, offload)."""

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        repeat_penalty: float = 1.1,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """``{text, prompt_tokens, completion_tokens, finish_reason, timings}``; timings are
        floats: ``load_s, prompt_eval_s, gen_s, ttft_s, gen_tokens_per_s``."""
        sampling = Sampling(max_tokens, temperature, top_k, top_p, repeat_penalty, seed)
        return self.generate(prompt, sampling).as_completion()

    @abstractmethod
    def close(self) -> None:
        """Release the model; the backend is unusable afterwards."""

    def __enter__(self) -> LlmBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
