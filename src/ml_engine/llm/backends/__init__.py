"""Text generation backends: llama.cpp through llama-cpp-python, and a clearly labelled mock.

Contract (used by the generation sweep and the HTTP server):

- ``open_backend(llm_cfg, models_dir) -> LlmBackend``
- ``LlmBackend.complete(prompt, *, max_tokens, temperature, top_k, top_p, repeat_penalty=1.1,
  seed=None) -> dict`` with ``text, prompt_tokens, completion_tokens, finish_reason, timings``
- ``LlmBackend.stream(prompt, *, same keywords) -> Iterator[str]`` (text pieces)
- ``LlmBackend.close()`` and ``LlmBackend.name`` (one of ``BACKENDS``)

A backend serves one request at a time; callers serialize access.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_engine.errors import UnknownNameError
from ml_engine.llm.backends.base import SAMPLING_FIELDS, Generation, LlmBackend, Sampling
from ml_engine.llm.models import ModelFile, ensure_model_file
from ml_engine.llm.threads import physical_core_count

# The one list of backend names: conf/llm/backend/<name>.yaml, config rules and the API's choices
# derive from it.
BACKENDS = ("llama_cpp", "mock")

__all__ = ["BACKENDS", "SAMPLING_FIELDS", "Generation", "LlmBackend", "Sampling", "open_backend"]


def _backend_name(llm_cfg: Mapping[str, Any]) -> str:
    backend = llm_cfg.get("backend")
    name = backend.get("name") if isinstance(backend, Mapping) else backend
    if name not in BACKENDS:
        raise UnknownNameError("llm backend", str(name), list(BACKENDS))
    return str(name)


def open_backend(
    llm_cfg: Mapping[str, Any], models_dir: Path, resolved: ModelFile | None = None
) -> LlmBackend:
    """A ready backend for the composed ``llm`` config node.

    ``llm_cfg`` holds ``backend`` (node with ``name``, one of ``BACKENDS``), ``model`` (a
    ``conf/llm/model`` node, or one with ``path``: the file at that path), ``quantization``
    (None: the model's default), ``n_gpu_layers``, ``n_ctx``, ``n_threads``, ``n_threads_batch``,
    ``n_batch``, ``flash_attn``, ``allow_download`` and ``allow_requantize``. The model file is
    resolved first: the embedded tiny model is written on first use and a missing quantization
    is produced from a higher-precision file on disk. User mistakes raise ``UserError`` with a
    one-line message.
    """
    name = _backend_name(llm_cfg)
    if name == "mock":
        from ml_engine.llm.backends.mock import MockBackend

        return MockBackend()
    from ml_engine.llm.backends.llama_cpp import LlamaCppBackend

    model_cfg = llm_cfg["model"]
    # null: llama-bench's default, the physical cores (quantizing a missing file uses them too)
    n_threads = llm_cfg.get("n_threads") or physical_core_count()
    quantization = llm_cfg.get("quantization")
    resolved = resolved or ensure_model_file(
        model_cfg,
        None if quantization is None else str(quantization),
        Path(models_dir),
        allow_download=bool(llm_cfg.get("allow_download", False)),
        allow_requantize=bool(llm_cfg.get("allow_requantize", False)),
        n_threads=n_threads,
    )
    backend_cfg = llm_cfg.get("backend") or {}
    backend = LlamaCppBackend(
        resolved.path,
        n_gpu_layers=int(llm_cfg.get("n_gpu_layers", 0)),
        n_ctx=int(llm_cfg.get("n_ctx", 2048)),
        n_threads=n_threads,
        n_threads_batch=llm_cfg.get("n_threads_batch"),
        n_batch=int(llm_cfg.get("n_batch", 512)),
        flash_attn=llm_cfg.get("flash_attn", "auto"),
        use_mmap=bool(backend_cfg.get("use_mmap", True)),
        chat_template=bool(model_cfg.get("chat_template", False)),
        ignore_eos=bool(model_cfg.get("ignore_eos", False)),
        verbose=bool(backend_cfg.get("verbose", False)),
    )
    backend.model_file = resolved  # how the file was obtained, for result files
    return backend
