"""llama.cpp through llama-cpp-python: build facts, devices, and the measured token loop."""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_engine.errors import UserError
from ml_engine.llm.backends.base import (
    CHAT_TEMPLATE_APPLIED,
    CHAT_TEMPLATE_MISSING,
    CHAT_TEMPLATE_UNKNOWN,
    Generation,
    LlmBackend,
    Sampling,
)
from ml_engine.llm.llama_log import (
    capture_llama_logs,
    last_llama_error,
    llama_load_reason,
    load_failure,
    load_report,
)
from ml_engine.llm.threads import physical_core_count

# llama.cpp's penalties sampler looks back this many generated tokens (common's default)
PENALTY_LAST_N = 64
# llama.cpp's own account of where the layers went (llama-model.cpp, load_tensors)
_LAYER_LINE = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\S+?),")
_OFFLOADED_LINE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# llama-context.cpp's verdict on flash_attn=auto ("resolve_fused_ops: Flash Attention enabled";
# older builds: "Flash Attention was auto, set to enabled")
_FLASH_ATTN_LINE = re.compile(r"Flash Attention (?:was auto, set to )?(enabled|disabled)")


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


# ---------------------------------------------------------------- llama.cpp's devices and layers

# enum ggml_backend_dev_type (ggml-backend.h), in order
_DEVICE_KINDS = ("CPU", "GPU", "IGPU", "ACCEL")
GPU_KINDS = frozenset({"GPU", "IGPU"})


@dataclass(frozen=True)
class Device:
    """A compute device in ggml's backend registry: what llama.cpp can place layers on."""

    name: str  # "CPU", "CUDA0", "Metal", "Vulkan0"
    kind: str  # one of _DEVICE_KINDS
    backend: str  # the ggml backend that registered it: "CPU", "CUDA", "Metal", "Vulkan"
    description: str


@functools.cache
def _ggml() -> Any:
    """The ggml library llama-cpp-python loaded, with the registry functions' C signatures."""
    import llama_cpp

    try:
        from llama_cpp._ggml import libggml
    except (ImportError, OSError):  # older bindings: libllama's handle resolves ggml's symbols
        libggml = llama_cpp.llama_cpp._lib
    signatures = {
        "ggml_backend_dev_count": ([], ctypes.c_size_t),
        "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
        "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
        "ggml_backend_dev_backend_reg": ([ctypes.c_void_p], ctypes.c_void_p),
        "ggml_backend_reg_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_type_name": ([ctypes.c_int], ctypes.c_char_p),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(libggml, name)
        function.argtypes, function.restype = argtypes, restype
    return libggml


def llama_devices() -> list[Device]:
    """ggml's device registry as llama.cpp sees it ([] when the bindings do not expose it)."""
    try:
        lib = _ggml()
    except (AttributeError, OSError):
        return []

    def text(raw: bytes | None) -> str:
        return (raw or b"").decode(errors="replace")

    devices = []
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        kind = lib.ggml_backend_dev_type(device)
        devices.append(
            Device(
                name=text(lib.ggml_backend_dev_name(device)),
                kind=_DEVICE_KINDS[kind] if 0 <= kind < len(_DEVICE_KINDS) else f"type {kind}",
                backend=text(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(device))),
                description=text(lib.ggml_backend_dev_description(device)),
            )
        )
    return devices


def llama_bench_devices(devices: Iterable[Device]) -> dict[str, str]:
    """llama-bench's cpu_info, gpu_info and backends fields for ``devices``: the CPU (and
    accelerator) descriptions, the GPU descriptions, the non-CPU backends ("CPU" when none)."""
    devices = list(devices)

    def described(kinds: Iterable[str]) -> str:
        return ", ".join(d.description for d in devices if d.kind in kinds)

    others = _unique(d.backend for d in devices if d.backend != "CPU")
    return {
        "cpu_info": described(("CPU", "ACCEL")),
        "gpu_info": described(GPU_KINDS),
        "backends": ",".join(others) or "CPU",
    }


def build_info() -> dict[str, Any]:
    """What this llama.cpp build says of itself. llama-cpp-python's library exports neither
    llama_commit nor llama_build_number (llama-bench's build_commit/build_number), but the ggml
    built inside llama.cpp takes llama.cpp's commit as its own (llama.cpp's CMakeLists passes
    it down): that is build_commit, as llama-bench prints it (without git's "-dirty", which
    the sdist's build adds). The build number stays None: ggml carries none."""
    import llama_cpp

    info: dict[str, Any] = {
        "build_commit": "unknown",
        "build_number": None,
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }
    try:
        lib = _ggml()
        for name in ("ggml_version", "ggml_commit"):
            function = getattr(lib, name)
            function.argtypes, function.restype = [], ctypes.c_char_p
            info[name] = (function() or b"").decode(errors="replace")
    except (AttributeError, OSError):
        pass
    commit = info.get("ggml_commit", "").removesuffix("-dirty")
    if commit and commit != "unknown":
        info["build_commit"] = commit
    return info


def ggml_type_name(kind: int) -> str:
    try:
        return (_ggml().ggml_type_name(kind) or b"").decode() or str(kind)
    except (AttributeError, OSError):
        return str(kind)


def compute_backend_of_build() -> str:
    """The ggml backends of the GPUs llama.cpp can use ("CUDA", "Metal+Vulkan"), CPU when it
    can use none, "unknown" when the registry cannot be read but llama.cpp claims GPU offload."""
    devices = llama_devices()
    if not devices:
        return "unknown" if gpu_offload_supported() else "CPU"
    return "+".join(_unique(d.backend for d in devices if d.kind in GPU_KINDS)) or "CPU"


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Offload:
    """Where llama.cpp put a model's layers, from llama.cpp's own account.

    ``layers``: layers on a GPU, counting the output layer as llama.cpp does (``n_layer + 1`` is
    everything); None when llama.cpp said nothing that could be read. ``source`` names what the
    figures rest on; ``gpu_available``: llama.cpp had a GPU to offload to.
    """

    layers: int | None
    compute_backend: str
    source: str
    gpu_available: bool
    layer_devices: tuple[str, ...] = ()


def offload_account(
    load_lines: Iterable[str], devices: Iterable[Device], gpu_offload: bool
) -> Offload:
    """Read llama.cpp's placement of the layers from its load log and device registry.

    Per-layer lines ("layer 3 assigned to device CUDA0") come first; the summary line
    ("offloaded 33/33 layers to GPU") when they are absent; with neither, a registry without any
    GPU (or, when the registry cannot be read, ``gpu_offload``: llama_supports_gpu_offload()
    false) means nothing could be offloaded. Otherwise the count is unknown, never assumed.
    """
    lines = list(load_lines)
    registry = {d.name: d for d in devices}
    has_gpu = any(d.kind in GPU_KINDS for d in registry.values()) if registry else gpu_offload
    placed = {int(m.group(1)): m.group(2) for m in map(_LAYER_LINE.search, lines) if m}
    if placed:
        names = tuple(placed[i] for i in sorted(placed))
        # offloaded: on a GPU, or on a device the registry does not list (an RPC server, say)
        on_gpu = [n for n in names if n not in registry or registry[n].kind in GPU_KINDS]
        backends = _unique(registry[n].backend if n in registry else n for n in on_gpu)
        return Offload(len(on_gpu), "+".join(backends) or "CPU", "load log", has_gpu, names)
    summary = next((m for m in map(_OFFLOADED_LINE.search, lines) if m), None)
    if summary is not None:
        layers = int(summary.group(1))
        gpus = _unique(d.backend for d in registry.values() if d.kind in GPU_KINDS)
        backend = "CPU" if layers == 0 else "+".join(gpus) or "unknown"
        return Offload(layers, backend, "load log", has_gpu)
    if not has_gpu:
        source = "device registry" if registry else "llama_supports_gpu_offload"
        return Offload(0, "CPU", source, has_gpu)
    return Offload(None, "unknown", "none", has_gpu)


# --------------------------------------------------------------------------- llama.cpp backend


def penalized_argmax(logits: np.ndarray, window: Collection[int], penalty: np.float32) -> int:
    """The first maximum of ``logits`` after llama.cpp's repeat penalty on each distinct token
    of ``window`` (logit / p when > 0, else logit × p, in float32), applied in place.

    A penalty > 1 only lowers logits, so it is applied lazily: to the current maximum while
    that is a window token not yet penalized, then the argmax is taken again. Where the first
    maximum is a token outside the window (the usual case) that is one argmax and no numpy
    indexing: the eager form's five array operations cost ~170 µs a token between two decodes
    (every object cache-cold there), a quarter of a small model's per-token time outside
    llama_decode. The result is the eager form's: the returned token's value is final and
    every other token's current value is at least its final one, so it is the first maximum
    of the fully penalized logits too (tests/llm/test_llama_bench.py)."""
    if penalty < 1:  # raises logits: every window token can win, so all are penalized
        distinct = set(window)
        if distinct:
            seen = np.fromiter(distinct, dtype=np.intp, count=len(distinct))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return int(logits.argmax())
    token = int(logits.argmax())
    if penalty == 1 or token not in window:
        return token
    penalized: set[int] = set()
    while token in window and token not in penalized:
        value = logits[token]
        logits[token] = value / penalty if value > 0 else value * penalty
        penalized.add(token)
        token = int(logits.argmax())
    return token


@functools.cache
def _logits_address_function() -> Callable[[Any, int], int | None]:
    """``llama_get_logits_ith`` returning the address as an int (None for NULL): a
    foreign-function object of its own, so the restype of llama-cpp-python's shared one is
    left as it is."""
    import llama_cpp

    prototype = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)
    function = prototype(("llama_get_logits_ith", llama_cpp.llama_cpp._lib))
    return function


class LlamaCppBackend(LlmBackend):
    """A GGUF model loaded once; each request clears the KV cache (no prompt-prefix reuse).

    The token loop calls llama.cpp directly (decode → sample) instead of going through
    ``Llama.create_completion``, whose per-token Python work would otherwise be a visible share
    of the measured rate on small models.
    """

    name = "llama_cpp"

    def __init__(
        self,
        model_path: Path,
        *,
        n_gpu_layers: int = 0,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_batch: int = 512,
        flash_attn: bool | str = "auto",
        use_mmap: bool = True,
        chat_template: bool = False,
        ignore_eos: bool = False,
        verbose: bool = False,
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        capture_llama_logs(echo=verbose)
        self.model_path = Path(model_path)
        self.n_gpu_layers_requested = n_gpu_layers
        self.ignore_eos = ignore_eos
        self.use_chat_template = chat_template
        # llama-bench's defaults, not llama-cpp-python's (half the logical cores)
        n_threads = n_threads or physical_core_count()
        n_threads_batch = n_threads_batch or n_threads
        self.flash_attn_requested = flash_attn_choice(flash_attn)
        self.use_mmap = bool(use_mmap)
        started = time.perf_counter()
        with load_report() as load_lines:
            try:
                with _flash_attn_type(self.flash_attn_requested), _unparsed_templates_kept():
                    self._llama = llama_cpp.Llama(
                        str(self.model_path),
                        n_gpu_layers=n_gpu_layers,
                        n_ctx=n_ctx,
                        n_batch=n_batch,
                        n_ubatch=n_batch,
                        n_threads=n_threads,
                        n_threads_batch=n_threads_batch,
                        flash_attn=self.flash_attn_requested == "on",
                        use_mmap=use_mmap,
                        verbose=verbose,
                    )
            except (ValueError, RuntimeError) as exc:
                raise UserError(load_failure(self.model_path, llama_load_reason())) from exc
        self.flash_attn = flash_attn_outcome(self.flash_attn_requested, load_lines)
        self.load_s = time.perf_counter() - started
        self.offload = offload_account(load_lines, llama_devices(), gpu_offload_supported())
        self._ctx = self._llama._ctx.ctx
        self._model = self._llama._model.model
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        # llama.cpp may round the context up (to 256 at least): keep both for messages.
        self.n_ctx_requested = n_ctx
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.n_batch = int(n_batch)
        # what the context got, from llama.cpp itself
        self.n_threads = int(llama_cpp.llama_n_threads(self._ctx))
        self.n_threads_batch = int(llama_cpp.llama_n_threads_batch(self._ctx))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._closed = False
        self._template = None
        self.chat_template_status = "off"
        template = llama_cpp.llama_model_chat_template(self._model, None)
        # a chat needs the model's template: one Jinja cannot parse refuses chats (not loads)
        self.chat_template_error = _template_error(template)
        if chat_template:
            if not template:
                self.chat_template_status = CHAT_TEMPLATE_MISSING
            elif self.chat_template_error is not None:
                self.chat_template_status = CHAT_TEMPLATE_BROKEN
            elif self._apply_template(template, "x") is None:
                self.chat_template_status = CHAT_TEMPLATE_UNKNOWN
            else:
                self._template, self.chat_template_status = template, CHAT_TEMPLATE_APPLIED

    # ---- facts

    def describe(self) -> dict[str, Any]:
        lib = self._lib
        buffer = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self._model, buffer, len(buffer))
        n_layer = int(lib.llama_model_n_layer(self._model))
        offload = self.offload
        return {
            "backend": self.name,
            "model_path": str(self.model_path),
            "model_description": buffer.value.decode(errors="replace"),
            "file_size_bytes": self.model_path.stat().st_size,
            "n_params": int(lib.llama_model_n_params(self._model)),
            "n_layer": n_layer,
            "n_vocab": self.n_vocab,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads_batch,
            "n_gpu_layers_requested": self.n_gpu_layers_requested,
            # from llama.cpp's own account (load log, device registry), never from the request
            "n_gpu_layers_effective": offload.layers,
            "gpu_offload_supported": gpu_offload_supported(),
            "compute_backend": offload.compute_backend,
            "offload_source": offload.source,
            "layer_devices": list(offload.layer_devices),
            "llama_devices": [d.name for d in llama_devices()],
            "offload_note": _offload_note(offload, self.n_gpu_layers_requested, n_layer),
            # what happened to the prompts, never what was asked for: a file without a template
            # (or with one llama.cpp cannot apply) runs the prompts as given and says so
            "chat_template": self.chat_template_status,
            "chat_template_used": self._template is not None,
            "add_bos": self.add_bos,
            "load_s": self.load_s,
            # llama-bench's fields (llm/llama_bench_format.py)
            "model_size": int(lib.llama_model_size(self._model)),
            "n_ubatch": int(lib.llama_n_ubatch(self._ctx)),
            "type_k": ggml_type_name(self._llama.context_params.type_k),
            "type_v": ggml_type_name(self._llama.context_params.type_v),
            # what llama.cpp decided (auto: enabled where its backends implement it)
            "flash_attn": self.flash_attn,
            "flash_attn_requested": self.flash_attn_requested,
            "use_mmap": self.use_mmap,
            **llama_bench_devices(llama_devices()),
            **build_info(),
        }

    # ---- tokens

    def _apply_template(self, template: bytes, prompt: str) -> str | None:
        """``prompt`` as the user turn of ``template``; None when llama.cpp cannot apply it."""
        message = (self._lib.llama_chat_message * 1)(
            self._lib.llama_chat_message(b"user", prompt.encode())
        )
        size = max(1024, 4 * len(prompt.encode()) + 512)
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            n = self._lib.llama_chat_apply_template(template, message, 1, True, buffer, size)
            if n < 0:  # a template llama.cpp does not recognise
                return None
            if n <= size:
                return buffer.raw[:n].decode("utf-8", errors="replace")
            size = n + 1
        return None

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> tuple[str, str]:
        """``(role, content)`` messages as one prompt with the assistant's turn opened, through
        llama.cpp's llama_chat_apply_template: in the file's own template when llama.cpp
        recognises it, else in llama.cpp's built-in "chatml". Returns the text and what was
        used: "model", or "chatml" with why (the file has none, or llama.cpp cannot apply it)."""
        self._check_template()
        template = self._lib.llama_model_chat_template(self._model, None)
        if template:
            text = self._apply_messages(template, messages)
            if text is not None:
                return text, "model"
            fallback = f"chatml ({CHAT_TEMPLATE_UNKNOWN}: the file's template)"
        else:
            fallback = f"chatml ({CHAT_TEMPLATE_MISSING})"
        text = self._apply_messages(b"chatml", messages)
        if text is None:  # cannot happen: chatml is built into llama.cpp
            raise UserError("llama.cpp could not apply its built-in chatml template")
        return text, fallback

    def _apply_messages(self, template: bytes, messages: list[tuple[str, str]]) -> str | None:
        encoded = [(role.encode(), content.encode()) for role, content in messages]
        array = (self._lib.llama_chat_message * len(encoded))(
            *(self._lib.llama_chat_message(role, content) for role, content in encoded)
        )
        size = max(1024, 2 * sum(len(c) + 32 for _, c in encoded))
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            n = self._lib.llama_chat_apply_template(
                template, array, len(encoded), True, buffer, size
            )
            if n < 0:
                return None
            if n <= size:
                return buffer.raw[:n].decode("utf-8", errors="replace")
            size = n + 1
        return None

    def _check_template(self) -> None:
        if self.chat_template_error is not None:
            raise UserError(
                f"the chat template of {self.model_path} does not parse "
                f"({self.chat_template_error}), so no chat can be formatted for this model: "
                "fix its tokenizer.chat_template, or send the prompt already formatted as a "
                "plain completion (/v1/completions)"
            )

    def format_prompt(self, prompt: str) -> str:
        """The prompt in the model's chat template, when configured and applicable."""
        if self.use_chat_template:
            self._check_template()
        if not self._template:
            return prompt
        formatted = self._apply_template(self._template, prompt)
        return prompt if formatted is None else formatted

    @property
    def add_bos(self) -> bool:
        """The model's tokenizer starts a text with BOS (llama.cpp's add_bos_token)."""
        return bool(self._lib.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos(self) -> int:
        return int(self._lib.llama_vocab_bos(self._vocab))

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), tokens, capacity, True, special)
        if n < 0:
            capacity = -n
            tokens = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(
                self._vocab, data, len(data), tokens, capacity, True, special
            )
        return list(tokens[:n])

    def prompt_tokens(self, prompt: str) -> list[int]:
        """Tokens of the (chat-formatted) prompt, checked against the context size."""
        if not prompt:
            raise UserError("the prompt is empty; expected at least one character")
        text = self.format_prompt(prompt)
        tokens = self.tokenize(text, special=self._template is not None)
        if len(tokens) >= self.n_ctx:
            raise UserError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx} "
                f"(llm.n_ctx={self.n_ctx_requested}); raise llm.n_ctx or shorten the prompt"
            )
        return tokens

    def piece(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buffer, 256, 0, False)
        return self._piece_buffer.raw[: max(n, 0)]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    # ---- decoding

    def _clear_kv_cache(self) -> None:
        lib = self._lib
        if hasattr(lib, "llama_memory_clear"):
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        elif hasattr(lib, "llama_kv_self_clear"):
            lib.llama_kv_self_clear(self._ctx)
        else:
            lib.llama_kv_cache_clear(self._ctx)

    def _decode(
        self, tokens: list[int], start_pos: int, *, all_logits: bool, logits_from: int = 0
    ) -> None:
        """Decode one batch; outputs for every position ≥ ``logits_from`` when ``all_logits``,
        else for the last one only."""
        batch = self._batch
        n = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = (all_logits and start_pos + i >= logits_from) or i == n - 1
        batch.n_tokens = n
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}: {last_llama_error()}")

    def _decode_prompt(self, tokens: list[int]) -> None:
        for start in range(0, len(tokens), self.n_batch):
            self._decode(tokens[start : start + self.n_batch], start, all_logits=False)

    def _penalties(self, repeat_penalty: float):
        init = self._lib.llama_sampler_init_penalties
        args = (PENALTY_LAST_N, repeat_penalty, 0.0, 0.0)
        # Some llama-cpp-python versions still take the vocabulary size first.
        if len(getattr(init, "argtypes", None) or args) == 5:
            args = (self.n_vocab, *args)
        return init(*args)

    def _sampler(self, sampling: Sampling, grammar: str | None = None):
        """llama.cpp's chain: penalties → top_k → top_p → temp → dist (greedy: penalties →
        greedy, what ``_greedy_picker`` reproduces without the chain). Its own timing is on.
        A GBNF ``grammar`` (structured output, tool calls) goes first: every later sampler
        then only sees the tokens that keep the text inside it."""
        lib = self._lib
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = False  # the default is off: the chain's t_sample_ms is compared with
        chain = lib.llama_sampler_chain_init(params)
        if grammar is not None:
            constrained = lib.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not constrained:  # llama.cpp logged why; the grammar comes from a request
                lib.llama_sampler_free(chain)
                raise UserError(f"llama.cpp could not parse the grammar: {last_llama_error()}")
            lib.llama_sampler_chain_add(chain, constrained)
        if sampling.repeat_penalty != 1.0:
            lib.llama_sampler_chain_add(chain, self._penalties(sampling.repeat_penalty))
        if sampling.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(sampling.top_k))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(sampling.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(sampling.temperature))
        seed = 0xFFFFFFFF if sampling.seed is None else int(sampling.seed) & 0xFFFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def _greedy_picker(self, repeat_penalty: float) -> Callable[[], int]:
        """Greedy without llama.cpp's sampler chain, whose per-call work (a candidate array of
        the whole vocabulary built and walked by each sampler) would be the largest share of a
        small model's token besides llama_decode: the last logits as a numpy view, the repeat
        penalty as llama.cpp's penalties sampler applies it (each distinct token among the last
        ``PENALTY_LAST_N`` generated: logit / p when > 0, else logit × p, in float32), argmax
        (first maximum, as llama.cpp's greedy sampler). Prompt tokens are not in the window:
        the chain only ever accepts sampled tokens either.

        Between two decodes every touched object is cache-cold (the decode streamed the whole
        model through the caches), so a Python step there costs several times its warm price:
        the logits address comes back as a plain int, the view over it is reused while the
        address stays, and the penalty is applied in place (the next decode overwrites the
        buffer) rather than on a copy of the whole vocabulary, and only to the tokens that
        could win (``penalized_argmax``)."""
        ctx, n_vocab = self._ctx, self.n_vocab
        logits_address = _logits_address_function()
        penalty = np.float32(repeat_penalty)
        window: deque[int] = deque(maxlen=PENALTY_LAST_N)
        view: list[Any] = [-1, None]  # address, numpy view over it

        def pick() -> int:
            address = logits_address(ctx, -1)
            if address != view[0]:
                if address is None:
                    raise RuntimeError(f"llama_get_logits_ith failed: {last_llama_error()}")
                buffer = (ctypes.c_float * n_vocab).from_address(address)
                view[0], view[1] = address, np.frombuffer(buffer, dtype=np.float32)
            token = penalized_argmax(view[1], window, penalty)
            window.append(token)
            return token

        return pick

    def _token_loop(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        record: Generation,
        grammar: str | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids; fills ``record``'s clock readings and finish reason."""
        lib, ctx = self._lib, self._ctx
        clock = time.perf_counter
        limit = min(sampling.max_tokens, self.n_ctx - len(prompt_ids))
        # the greedy shortcut skips llama.cpp's chain, so a grammar needs the chain
        greedy = sampling.temperature <= 0 and grammar is None
        sampler = None if greedy else self._sampler(sampling, grammar)
        if greedy:
            next_token = self._greedy_picker(sampling.repeat_penalty)
        else:
            next_token = functools.partial(lib.llama_sampler_sample, sampler, ctx, -1)
        if record.top_logprobs is not None:  # OpenAI's logprobs: recorded as tokens are picked
            from ml_engine.llm.embeddings import logprob_picker

            next_token = logprob_picker(self, next_token, record.top_logprobs, record.logprobs)
        batch = self._batch
        try:
            self._clear_kv_cache()
            lib.llama_perf_context_reset(ctx)
            record.prompt_tokens = len(prompt_ids)
            t_start = clock()
            self._decode_prompt(prompt_ids)
            lib.llama_synchronize(ctx)
            t_prompt = clock()
            token = next_token()
            t_first = clock()
            record.prompt_eval_s, record.ttft_s = t_prompt - t_start, t_first - t_start
            # Single-token batches from here on: only the token and its position change.
            batch.n_tokens, batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 1, 0, 1
            position, produced, decoded = len(prompt_ids), 0, 0
            # a grammar allows end-of-generation only once its text is complete: honoured
            # even where the model is set to ignore it (the random tiny model)
            ignore_eos, is_eog = self.ignore_eos and grammar is None, lib.llama_vocab_is_eog
            decode, vocab = lib.llama_decode, self._vocab
            record.finish_reason = "length"
            while limit > 0:
                if not ignore_eos and is_eog(vocab, token):
                    record.finish_reason = "stop"
                    break
                produced += 1
                yield token
                if produced >= limit:
                    break
                batch.token[0], batch.pos[0] = token, position
                if decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed: {last_llama_error()}")
                position += 1
                decoded += 1
                token = next_token()
            lib.llama_synchronize(ctx)
            record.gen_s = clock() - t_first
            record.n_decoded = decoded
            record.counters = self.perf_counters()
            record.counters.update(self._sampler_counters(sampler))
        finally:
            if sampler is not None:
                lib.llama_sampler_free(sampler)

    def _sampler_counters(self, sampler: Any) -> dict[str, float]:
        """llama.cpp's own timing of its sampler chain (none for greedy, which skips it)."""
        if sampler is None:
            return {"sample_ms": 0.0, "n_sample": 0}
        data = self._lib.llama_perf_sampler(sampler)
        return {"sample_ms": float(data.t_sample_ms), "n_sample": int(data.n_sample)}

    def perf_counters(self) -> dict[str, float]:
        """llama.cpp's own prompt/decode counters since the last reset (after synchronizing)."""
        lib = self._lib
        lib.llama_synchronize(self._ctx)
        data = lib.llama_perf_context(self._ctx)
        return {
            "p_eval_ms": float(data.t_p_eval_ms),
            "n_p_eval": int(data.n_p_eval),
            "eval_ms": float(data.t_eval_ms),
            "n_eval": int(data.n_eval),
            "eval_tokens_per_s": 1000.0 * data.n_eval / data.t_eval_ms
            if data.t_eval_ms
            else float("nan"),
        }

    # ---- llama-bench's tests (timed by the caller, llm/bench.py)

    def reset_for_bench(self) -> None:
        """An empty KV cache and zeroed counters: the state every llama-bench repetition
        starts from."""
        self._clear_kv_cache()
        self._lib.llama_perf_context_reset(self._ctx)

    def bench_prompt(self, tokens: Sequence[int]) -> None:
        """llama-bench's pp test: ``tokens`` decoded in n_batch-sized batches, outputs for each
        batch's last position only, then one synchronize."""
        for start in range(0, len(tokens), self.n_batch):
            self._decode(list(tokens[start : start + self.n_batch]), start, all_logits=False)
        self._lib.llama_synchronize(self._ctx)

    def bench_gen(self, tokens: Sequence[int]) -> None:
        """llama-bench's tg test: one single-token decode per token, each synchronized; no
        sampling (the next token is the given one, whatever the logits say)."""
        lib, ctx, batch = self._lib, self._ctx, self._batch
        decode, synchronize = lib.llama_decode, lib.llama_synchronize
        batch.n_tokens, batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 1, 0, 1
        for position, token in enumerate(tokens):
            batch.token[0], batch.pos[0] = token, position
            if decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed: {last_llama_error()}")
            synchronize(ctx)

    def generate_ids(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        record: Generation,
        grammar: str | None = None,
    ) -> Iterator[int]:
        """The measured token loop on a prompt already tokenized (a chat formatted by
        ``apply_chat_template``, a raw completion prompt); closing it stops the generation."""
        return self._token_loop(prompt_ids, sampling, record, grammar)

    def generate(self, prompt: str, sampling: Sampling) -> Generation:
        record = Generation(load_s=self.load_s)
        prompt_ids = self.prompt_tokens(prompt)
        record.tokens = list(self._token_loop(prompt_ids, sampling, record))
        record.text = self.detokenize(record.tokens)
        return record

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        record = Generation(load_s=self.load_s)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in self._token_loop(self.prompt_tokens(prompt), Sampling(**sampling), record):
            text = decoder.decode(self.piece(token))
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def chunk_logprobs(self, tokens: list[int], first: int) -> np.ndarray:
        """Log-probabilities (float64) of the next token after ``tokens[first:-1]``, the chunk
        decoded from an empty KV cache: ``(len(tokens) - 1 - first) × n_vocab``.

        As llama-perplexity does, llama.cpp is asked for outputs at positions ≥ ``first`` only.
        """
        if not 0 <= first < len(tokens) - 1 or len(tokens) > self.n_ctx:
            raise ValueError(f"need first < len(tokens) - 1 ≤ {self.n_ctx - 1}; got {first}")
        self._clear_kv_cache()
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self._decode(chunk, start, all_logits=True, logits_from=first)
            end = start + len(chunk)
            if end <= first:  # the batch's last position alone came back: before the window
                continue
            pointer = self._lib.llama_get_logits(self._ctx)
            logits = np.ctypeslib.as_array(pointer, shape=(end - max(first, start), self.n_vocab))
            rows.append(_log_softmax(logits))
        # the last position predicts past the chunk
        return np.concatenate(rows)[:-1]

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._lib.llama_batch_free(self._batch)
        self._llama.close()


_GGML_TYPE_F32 = 0
# chat_template=true on a file whose template Jinja cannot parse (chats are refused)
CHAT_TEMPLATE_BROKEN = "does not parse"
_formatter_lock = threading.Lock()


@functools.cache
def _tolerant_formatter() -> type:
    """llama-cpp-python's Jinja2ChatFormatter, keeping a template Jinja cannot parse (with why,
    ``error``) instead of raising: ``Llama()`` compiles every template of a file for its own
    chat API, which this backend does not use (llama_chat_apply_template formats its chats),
    so one bad template made the whole file unloadable."""
    from jinja2 import TemplateError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    class TolerantFormatter(Jinja2ChatFormatter):
        error: str | None = None

        def __init__(self, template: str, *args: Any, **kwargs: Any) -> None:
            try:
                super().__init__(template, *args, **kwargs)
            except TemplateError as exc:
                self.template, self.error = template, _jinja_reason(exc)

    return TolerantFormatter


def _jinja_reason(exc: Exception) -> str:
    message = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).splitlines()[0]
    line = getattr(exc, "lineno", None)
    return f"{message.rstrip('.')}, line {line}" if line else message


@contextlib.contextmanager
def _unparsed_templates_kept() -> Iterator[None]:
    """``Llama()`` builds its chat formatters with the tolerant one for the duration of the
    call (it looks the class up on its module at each use)."""
    from llama_cpp import llama_chat_format

    tolerant = _tolerant_formatter()
    with _formatter_lock:
        original = llama_chat_format.Jinja2ChatFormatter
        llama_chat_format.Jinja2ChatFormatter = tolerant
        try:
            yield
        finally:
            llama_chat_format.Jinja2ChatFormatter = original


def _template_error(template: bytes | None) -> str | None:
    """Why Jinja (as llama-cpp-python sets it up) cannot parse ``template``; None when it can
    or there is none."""
    if not template:
        return None
    text = template.decode("utf-8", errors="replace")
    return _tolerant_formatter()(text, eos_token="", bos_token="").error


FLASH_ATTN_CHOICES = ("auto", True, False)
_flash_attn_lock = threading.Lock()


def flash_attn_choice(value: bool | str | None) -> str:
    """``llm.flash_attn`` as llama.cpp's -fa words: auto (its default), on, off."""
    if value is None or value == "auto":
        return "auto"
    return "on" if value is True or value == "on" else "off"


@contextlib.contextmanager
def _flash_attn_type(choice: str) -> Iterator[None]:
    """llama-cpp-python 0.3.36's ``Llama()`` turns its bool ``flash_attn`` into llama.cpp's
    ENABLED or DISABLED and cannot ask for llama.cpp's own default, AUTO, which enables flash
    attention wherever the layers' backends implement it (CPU included: pp512 731 vs 582 t/s,
    tg 77 vs 68 t/s on the 111M q4_k_m bench model, llama-bench -fa 1 vs 0). For "auto" the
    constant it reads for "disabled" is AUTO for the duration of the call."""
    if choice != "auto":
        yield
        return
    import llama_cpp.llama_cpp as bindings

    with _flash_attn_lock:
        disabled = bindings.LLAMA_FLASH_ATTN_TYPE_DISABLED
        bindings.LLAMA_FLASH_ATTN_TYPE_DISABLED = bindings.LLAMA_FLASH_ATTN_TYPE_AUTO
        try:
            yield
        finally:
            bindings.LLAMA_FLASH_ATTN_TYPE_DISABLED = disabled


def flash_attn_outcome(choice: str, load_lines: Iterable[str]) -> bool:
    """Whether flash attention is on: as asked, or for auto as llama.cpp's log says it chose."""
    if choice != "auto":
        return choice == "on"
    for line in load_lines:
        found = _FLASH_ATTN_LINE.search(line)
        if found:
            return found.group(1) == "enabled"
    return False  # llama.cpp said nothing: assume the conservative answer


def exact_logits(
    model_path: Path, tokens: list[int], *, n_ctx: int, n_threads: int | None = None
) -> np.ndarray:
    """Raw logits at every position of ``tokens`` with an f32 KV cache (llama.cpp's default is
    f16): what an exported f32 file is compared with the PyTorch network on."""
    import llama_cpp

    model = llama_cpp.Llama(
        str(model_path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        logits_all=True,
        type_k=_GGML_TYPE_F32,
        type_v=_GGML_TYPE_F32,
        verbose=False,
    )
    try:
        model.eval(tokens)
        return np.asarray(model.scores[: len(tokens)], dtype=np.float64)
    finally:
        model.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _offload_note(offload: Offload, requested: int, n_layer: int) -> str:
    if offload.layers is None:
        return "llama.cpp did not report where the layers went (no placement lines in its log)"
    if offload.layers > 0:
        return f"llama.cpp put {offload.layers}/{n_layer + 1} layers on {offload.compute_backend}"
    if requested == 0:
        return "CPU only (n_gpu_layers=0)"
    if not offload.gpu_available:
        return (
            "llama.cpp sees no GPU device (a CPU-only build, or none visible): n_gpu_layers has "
            "no effect; see README"
        )
    return f"llama.cpp kept every layer on the CPU although n_gpu_layers={requested}"
