"""Text generation for the API: composed LLM configs, a cache of loaded backends, one request
at a time per loaded model (a llama.cpp context is not thread-safe), other work continues.

Models are the configured ones (``conf/llm/model/*.yaml``), the GGUF files the operator names
(``llm.files``: any GGUF llama.cpp supports, named by its ``general.name``, else its file stem) and
the GGUF files exported into training runs (``<exports_dir>/*/*.gguf``, where ``export.py`` writes
them), named by their file stem. A request names a model; the server alone maps a name to a file.

llama.cpp models load and generate in worker processes (``llm_process``): a file that makes
llama.cpp abort ends its worker, not the server. The mock backend stays in-process. The cache
of loaded models is an LRU bounded by count (``llm.cache_size``) and by the workers' resident
memory (``llm.cache_mb``); a loaded context serves any request for the same model,
quantization and n_gpu_layers whose n_ctx it holds.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.run.helpers import finite_or_none, first_line
from ml_engine.run.locations import CONFIG_DIR
from ml_engine.server.errors import StorageFull, is_no_space
from ml_engine.server.generation_queue import Cancellation, ClientGone
from ml_engine.server.llm_process import LlmProcess, WorkerCrashed
from ml_engine.server.metrics import ServerMetrics
from ml_engine.server.schemas import NAME_PATTERN

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "repeat_penalty", "seed")

_hydra_lock = threading.Lock()
# composed configs by (config name, overrides): the configs are the installation's (as
# _configured_names reads them, a changed one needs a restart), and composing one took Hydra
# 0.1 s, seven of them for each /llm/models or /v1/models and one for each generation, every one
# under the lock. Bounded: a request's overrides (n_ctx, quantization) make new keys.
_composed: OrderedDict[tuple[str, tuple[str, ...]], DictConfig] = OrderedDict()
_COMPOSED_MAX = 128


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides``, inside or outside a Hydra run;
    a copy of the one composed before for the same arguments, which the caller may change.

    Hydra's composition state is process-global, hence the lock.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    key = (config_name, tuple(overrides))
    with _hydra_lock:
        composed = _composed.get(key)
        if composed is not None:
            _composed.move_to_end(key)
        elif GlobalHydra.instance().is_initialized():
            composed = compose(config_name, overrides=list(overrides))
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                composed = compose(config_name, overrides=list(overrides))
        _composed[key] = composed
        while len(_composed) > _COMPOSED_MAX:
            _composed.popitem(last=False)
    return copy.deepcopy(composed)


def finite_values(values: dict[str, Any]) -> dict[str, float | None]:
    """NaN (a rate over zero tokens) is not JSON: it becomes null."""
    return {key: finite_or_none(v) for key, v in values.items()}


@dataclass(frozen=True)
class LlmKey:
    backend: str
    model: str
    quantization: str | None
    n_ctx: int | None
    n_gpu_layers: int | None

    def overrides(self) -> list[str]:
        """The settings as overrides of the generation config; the model is set apart (a
        configured one is a config option, an exported one a file)."""
        values = [f"llm/backend={self.backend}"]
        if self.quantization is not None:
            values.append(f"llm.quantization={self.quantization}")
        if self.n_ctx is not None:
            values.append(f"llm.n_ctx={self.n_ctx}")
        if self.n_gpu_layers is not None:
            values.append(f"llm.n_gpu_layers={self.n_gpu_layers}")
        return values

    def family(self) -> tuple[str, str, str | None, int | None]:
        """What a loaded context must match to serve a request (its n_ctx may be larger)."""
        return self.backend, self.model, self.quantization, self.n_gpu_layers


@dataclass
class _Loaded:
    backend: Any
    quantization: str | None
    key: LlmKey | None = None  # resolved: every setting filled in
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    # what memory_fit estimated the load takes (0: not estimated: the mock, a file not yet
    # written); held against llm.memory_budget with the other loaded models'
    estimate_bytes: int = 0
    # when its last request gave it back (monotonic), for llm.idle_unload_s
    last_used: float = field(default_factory=time.monotonic)

    def serves(self, key: LlmKey) -> bool:
        if self.key is None or self.key.family() != key.family():
            return False
        return key.n_ctx is None or (self.key.n_ctx or 0) >= key.n_ctx

    def rss_bytes(self) -> int:
        rss = getattr(self.backend, "rss_bytes", None)
        return rss() if rss is not None else 0


def _alive(entry: _Loaded) -> bool:
    alive = getattr(entry.backend, "alive", None)
    return alive is None or alive()


def _api_name(path: Path) -> str:
    """A given file's model name: its ``general.name`` made into an API name ("Qwen2.5 0.5B
    Instruct" → "Qwen2.5-0.5B-Instruct"), else its file stem."""
    from ml_engine.llm.models import read_gguf_facts

    facts = read_gguf_facts(path)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", facts.name or "").strip("-._")[:64]
    return name if re.fullmatch(NAME_PATTERN, name) else path.stem


def _name_given_files(files: Sequence[Path], taken: set[str]) -> dict[str, Path]:
    """``llm.files`` by model name; a file that is missing or not a GGUF stops the server
    with one line, a name another model has is refused the same way."""
    named: dict[str, Path] = {}
    for index, raw in enumerate(files):
        path = Path(raw).expanduser().resolve()
        where = f"llm.files[{index}]={raw}"
        if not path.is_file():
            raise UserError(f"{where}: no such file (expected a .gguf)")
        try:
            name = _api_name(path)
        except (OSError, ValueError, KeyError, IndexError) as error:
            raise UserError(f"{where} is not a readable GGUF file: {error}") from None
        if not re.fullmatch(NAME_PATTERN, name):
            raise UserError(f"{where}: no usable model name (general.name or the file stem)")
        if name in taken or name in named:
            raise UserError(
                f"{where}: model name '{name}' is already taken; rename the file or drop it"
            )
        named[name] = path
    return named


class LlmService:
    def __init__(
        self,
        models_dir: Path,
        config_name: str = "generate",
        allowed_models: tuple[str, ...] | None = None,
        cache_size: int = 2,
        produce_missing: bool = False,
        exports_dir: Path | None = None,
        files: Sequence[Path] = (),
        cache_mb: float | None = None,
        log_dir: Path | None = None,
        worker_timeout_s: float | None = None,
        stream_interval_ms: float = 0.0,
        metrics: ServerMetrics | None = None,
        memory_budget: int | None = None,
        idle_unload_s: float | None = None,
    ) -> None:
        self.models_dir, self.config_name = models_dir, config_name
        self._config_names: list[str] | None = None
        self.exports_dir = exports_dir
        self.given_files = _name_given_files(files, set(self._configured_names()))
        self._skipped: set[Path] = set()  # exported files already warned about
        self.allowed_models, self.cache_size = allowed_models, max(1, cache_size)
        self.produce_missing = produce_missing
        self._loaded: OrderedDict[LlmKey, _Loaded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._load_locks: dict[tuple[Any, ...], threading.Lock] = {}
        self.cache_bytes = None if cache_mb is None else int(cache_mb * 1024 * 1024)
        self.log_dir = log_dir or models_dir / "llm_workers"
        self.worker_timeout_s = worker_timeout_s
        self.stream_interval_ms = stream_interval_ms
        self._defaults: dict[str, tuple[str | None, int | None, int | None]] = {}
        # (model, quantization) → (loaded, error): what the last load of that file did
        self._tried: dict[tuple[str, str | None], tuple[bool, str | None]] = {}
        self._loading = 0  # workers being started, counted against cache_size
        self._worker_ids = itertools.count(1)
        self.load_count = 0  # loads since start, for tests and benchmarks
        self.peak_workers = 0  # most worker processes alive at once
        self._live_workers = 0
        self.metrics = metrics or ServerMetrics()
        self.memory_budget = memory_budget  # bytes, held to memory_fit's estimates
        self.idle_unload_s = idle_unload_s
        self.idle_unloads = 0  # models unloaded for idleness since start
        self._estimates: dict[LlmKey, int] = {}  # by resolved key, for /v1/models
        self._stopping = threading.Event()
        self._idle_thread: threading.Thread | None = None
        if idle_unload_s is not None:
            self._idle_thread = threading.Thread(
                target=self._unload_idle_loop, name="llm-idle-unload", daemon=True
            )
            self._idle_thread.start()

    def _configured_names(self) -> list[str]:
        """conf/llm/model/*.yaml, read once: the configs are the installation's (a new one
        needs a restart), and globbing them cost a third of a mock generation's time."""
        if self._config_names is None:
            from ml_engine.llm.models import model_names

            self._config_names = model_names()
        return list(self._config_names)

    def exported_models(self) -> dict[str, Path]:
        """GGUF files exported into training runs, by file stem, each resolved. What is not a
        regular file that lives in the exports folder (model_files.refusal: a FIFO, a directory,
        a link out of the folder), or whose stem is not a name (the API's pattern) or is one a
        configured model, a given file or an earlier run already has, is skipped with a
        warning: one odd entry never breaks the list."""
        if self.exports_dir is None or not self.exports_dir.is_dir():
            return {}
        from ml_engine.llm.imatrix import is_matrix_file
        from ml_engine.server.model_files import refusal

        taken = set(self._configured_names()) | set(self.given_files)
        found: dict[str, Path] = {}
        for path in sorted(self.exports_dir.glob("*/*.gguf")):
            if is_matrix_file(path):  # a model's importance matrix lies beside it
                continue
            name = path.stem
            why = refusal(path, self.exports_dir)
            if why is None and (not re.fullmatch(NAME_PATTERN, name) or name in taken | set(found)):
                why = f"{name!r} is not a free model name"
            if why is None:
                found[name] = path.resolve()
            elif path not in self._skipped:
                self._skipped.add(path)
                log.warning("not listing %s: %s", path, why)
        return found

    def file_models(self) -> dict[str, Path]:
        """Every model that is a file rather than a config: given files, then exports."""
        return {**self.given_files, **self.exported_models()}

    def model_names(self) -> list[str]:
        names = self._configured_names() + list(self.file_models())
        if self.allowed_models is not None:
            names = [n for n in names if n in self.allowed_models]
        return sorted(names)

    def llm_config(self, model: str, overrides: Sequence[str] = ()) -> DictConfig:
        """The composed ``llm`` node for ``model``; a given or exported model is its file, as
        ``generate.py llm.model.path=<file>`` makes it (name and quantization from the file)."""
        from ml_engine.llm.models import file_model_node

        path = self.file_models().get(model)
        if path is None:
            return compose_config(self.config_name, [f"llm/model={model}", *overrides]).llm
        llm = compose_config(self.config_name, list(overrides)).llm
        node = OmegaConf.to_container(llm.model, resolve=True)
        # a file's chat template is used when it has one (what llama-server does)
        with open_dict(llm):
            llm.model = file_model_node({**node, "path": str(path), "chat_template": True})
        return llm

    def check_model(self, name: str) -> None:
        names = self.model_names()
        if name not in names:
            raise UnknownNameError("llm model", name, names)

    def describe_models(self) -> list[dict[str, Any]]:
        exported = self.exported_models()
        return [self._describe(name, name in exported) for name in self.model_names()]

    def _describe(self, name: str, exported: bool) -> dict[str, Any]:
        """One entry of ``describe_models``; a model whose file cannot be read (or is gone
        since the start) is an entry with its error, never a failed list."""
        from ml_engine.llm.models import EMBEDDED, PACKAGED, available_quantizations, file_problem

        given = self.given_files.get(name)
        entry: dict[str, Any] = {
            "name": name,
            "quantizations_on_disk": [],
            "default_quantization": None,
            "file_on_disk": False,
            "embedded": False,
            "packaged": False,
            "exported": exported,
            "file": str(given) if given else None,
        }
        try:
            llm = self.llm_config(name)
        except UserError as exc:
            return {**entry, "usable": False, "error": first_line(exc)}
        on_disk = available_quantizations(llm.model, self.models_dir)
        default = OmegaConf.select(llm, "quantization", default=None)
        usable, error = self._tried.get((name, default), (None, None))
        problem = file_problem(llm.model)
        if problem is not None:
            usable, error = False, problem
        return {
            **entry,
            "quantizations_on_disk": on_disk,
            "default_quantization": default,
            "file_on_disk": default in on_disk,
            "embedded": llm.model.get("source") == EMBEDDED,
            "packaged": llm.model.get("source") == PACKAGED,
            "usable": usable,
            "error": error,
        }

    @staticmethod
    def default_model(models: list[dict[str, Any]]) -> str | None:
        """The model a client should preselect: one known to load (a file of the user's before
        the packaged model trained here, and that before the embedded one's random weights),
        then, in the same order, one whose file is on disk and has not been tried, then the
        embedded one (written on first use); never one whose file failed to load. None when
        every model would be refused."""

        def rank(model: dict[str, Any]) -> int:
            return 2 if model["embedded"] else 1 if model.get("packaged") else 0

        usable = sorted((m for m in models if m.get("usable")), key=rank)
        untried = [m for m in models if m.get("usable") is None]
        ranked = usable + sorted((m for m in untried if m["file_on_disk"]), key=rank)
        ranked += [m for m in untried if m["embedded"]]
        return ranked[0]["name"] if ranked else None

    def usable_models(self) -> list[str]:
        """Models a request may generate with as is (a file on disk or the embedded one) and
        whose file has not failed to load: what ``/v1/models`` lists."""
        models = self.describe_models()
        return [
            m["name"]
            for m in models
            if (m["file_on_disk"] or m["embedded"]) and m["usable"] is not False
        ]

    # loading ---------------------------------------------------------------------------------

    def _check_file(self, name: str, llm: DictConfig) -> None:
        """A request may only use model files already on disk: producing one (quantizing a
        7B model, say) is minutes of CPU and gigabytes of disk, an operator's decision
        (``llm.produce_missing=true``). The embedded tiny model is cheap and always allowed.
        A file that is no GGUF the server can read is refused saying what is wrong with it."""
        from ml_engine.llm.models import EMBEDDED, available_quantizations, file_problem
        from ml_engine.llm.quantize import check_quantization

        problem = file_problem(llm.model)
        if problem is not None:
            raise UserError(f"model '{name}' cannot be loaded: {problem}")
        quantization = check_quantization(str(llm.quantization))
        if self.produce_missing or llm.model.get("source") == EMBEDDED:
            return
        on_disk = available_quantizations(llm.model, self.models_dir)
        if quantization not in on_disk:
            raise UserError(
                f"quantization '{quantization}' of model '{name}' is not on disk; "
                f"on disk: {', '.join(on_disk) or '(none)'}"
            )

    def resolve(self, key: LlmKey) -> LlmKey:
        """``key`` with the config's values for what the request left out (the mock's as
        given: it loads nothing). Composed once per model."""
        if key.backend == "mock":
            return key
        if key.model not in self._defaults:
            llm = self.llm_config(key.model, [f"llm/backend={key.backend}"])
            self._defaults[key.model] = (
                OmegaConf.select(llm, "quantization", default=None),
                OmegaConf.select(llm, "n_ctx", default=None),
                OmegaConf.select(llm, "n_gpu_layers", default=None),
            )
        quantization, n_ctx, n_gpu_layers = self._defaults[key.model]
        return LlmKey(
            key.backend,
            key.model,
            key.quantization if key.quantization is not None else quantization,
            key.n_ctx if key.n_ctx is not None else n_ctx,
            key.n_gpu_layers if key.n_gpu_layers is not None else n_gpu_layers,
        )

    def _label(self, model: str, llm: DictConfig) -> str:
        path = self.file_models().get(model)
        return str(path) if path else f"model '{model}' ({llm.get('quantization')})"

    def _open(self, key: LlmKey) -> _Loaded:
        from ml_engine.llm.backends import open_backend

        llm = self.llm_config(key.model, key.overrides())
        if key.backend == "mock":  # cannot crash: stays in this process, fast
            return _Loaded(open_backend(llm, self.models_dir), None, key)
        self._check_file(key.model, llm)
        quantization = llm.get("quantization")
        log_path = self.log_dir / f"worker-{next(self._worker_ids)}-{key.model}.log"
        tried = (key.model, quantization)
        with self._cache_lock:
            self._live_workers += 1
            self.peak_workers = max(self.peak_workers, self._live_workers)
        try:
            node = OmegaConf.to_container(llm, resolve=True)
            process = LlmProcess(
                node,
                self.models_dir,
                log_path,
                self._label(key.model, llm),
                timeout_s=self.worker_timeout_s,
                stream_interval_ms=self.stream_interval_ms,
            )
        except OSError as exc:
            self._worker_gone()
            if is_no_space(exc):
                raise StorageFull(log_path.parent, "the model worker's log") from None
            raise
        except (UserError, WorkerCrashed) as exc:
            self._worker_gone()
            if isinstance(exc, WorkerCrashed):
                self.metrics.worker_crashed()
            self._tried[tried] = (False, first_line(exc))
            raise
        except BaseException:
            self._worker_gone()
            raise
        self.load_count += 1
        self.metrics.model_loaded("llm_worker")
        self._tried[tried] = (True, None)
        # the worker appends to its log: emptied, the log holds what follows the load, so that
        # a crash's reason is llama.cpp's last words about it
        log_path.open("wb").close()
        return _Loaded(process, quantization, key)

    def _worker_gone(self) -> None:
        with self._cache_lock:
            self._live_workers -= 1

    def acquire(self, key: LlmKey) -> _Loaded:
        """The loaded backend for ``key``, its lock held; release with ``release``."""
        self.check_model(key.model)
        key = self.resolve(key)
        while True:
            loaded = self._get_or_load(key)
            loaded.lock.acquire()
            if not loaded.closed:  # evicted between the lookup and the lock: load again
                return loaded
            loaded.lock.release()

    def release(self, loaded: _Loaded) -> None:
        """Give the model back; a worker that died during the request is dropped (the next
        request starts a fresh one)."""
        alive = getattr(loaded.backend, "alive", None)
        if alive is not None and not alive() and not loaded.closed:
            with self._cache_lock:
                if self._loaded.get(loaded.key) is loaded:
                    del self._loaded[loaded.key]
            loaded.closed = True
            loaded.backend.close()
            self._worker_gone()
            self.metrics.worker_crashed()
            log.warning("model worker for %s died; dropped", loaded.key)
        loaded.last_used = time.monotonic()
        loaded.lock.release()

    def _find(self, key: LlmKey) -> _Loaded | None:
        """The loaded entry that serves ``key``, the smallest context that fits first."""
        fits = [e for e in self._loaded.values() if e.serves(key)]
        return min(fits, key=lambda e: e.key.n_ctx or 0) if fits else None

    def _drop_dead(self) -> None:
        """Forget workers that died while idle (the OOM killer, a kill by hand): the request
        that would have met one starts a fresh worker instead of failing with a 502."""
        dead = []
        for entry in list(self._loaded.values()):
            # one in use is left to its request, which drops it on release
            if _alive(entry) or not entry.lock.acquire(blocking=False):
                continue
            del self._loaded[entry.key]
            entry.closed = True
            entry.lock.release()
            dead.append(entry)
            log.warning(
                "model worker for %s died while idle; the next request starts one", entry.key
            )
        if dead:
            threading.Thread(target=self._reap, args=(dead,), daemon=True).start()

    def _reap(self, dead: list[_Loaded]) -> None:
        for entry in dead:
            entry.backend.close()
            self._worker_gone()
            self.metrics.worker_crashed()

    def _get_or_load(self, key: LlmKey) -> _Loaded:
        with self._cache_lock:
            self._drop_dead()
            found = self._find(key)
            if found is not None:
                self._loaded.move_to_end(found.key)
                return found
            load_lock = self._load_locks.setdefault(key.family(), threading.Lock())
        with load_lock:  # one load per model at a time, other models load in parallel
            with self._cache_lock:
                found = self._find(key)
                if found is not None:
                    return found
            # before any worker starts: a load past llm.memory_budget is refused (one line)
            estimate = self.memory_estimate(key)
            with self._cache_lock:
                # room for one more before it starts: the count never exceeds cache_size
                evicted = []
                while self._loaded and len(self._loaded) + self._loading >= self.cache_size:
                    evicted.append(self._loaded.popitem(last=False)[1])
                # and the budget: least recently used models go until the new estimate fits
                while self._loaded and self._over_memory_budget(estimate):
                    evicted.append(self._loaded.popitem(last=False)[1])
                self._loading += 1
            try:
                for old in evicted:
                    self._close(old)
                loaded = self._open(key)
                loaded.estimate_bytes = estimate
            finally:
                with self._cache_lock:
                    self._loading -= 1
            with self._cache_lock:
                self._loaded[key] = loaded
                evicted = self._over_budget(loaded)
        for old in evicted:
            self._close(old)
        return loaded

    def memory_estimate(self, key: LlmKey) -> int:
        """memory_fit's estimate (bytes, a fresh worker's baseline included) of loading
        ``key`` (resolved), from the file's header; refused with a ``UserError`` naming the
        estimate and ``llm.memory_budget`` when past it. 0 for the mock and for a file not on
        disk yet (the embedded model is written on first use: too small to matter)."""
        if key.backend == "mock":
            return 0
        if key in self._estimates:
            estimate = self._estimates[key]
        else:
            from ml_engine.llm.memory_fit import MemoryEstimate, check_budget
            from ml_engine.llm.memory_fit import estimate as estimate_load
            from ml_engine.llm.models import model_path

            llm = self.llm_config(key.model, key.overrides())
            try:
                path = model_path(llm.model, str(llm.quantization), self.models_dir)
            except UserError:  # an unreadable file: the load says what is wrong with it
                return 0
            if not path.is_file():
                return 0
            try:
                found: MemoryEstimate = estimate_load(
                    path, int(llm.n_ctx or 0), n_batch=int(llm.get("n_batch") or 512)
                )
            except (OSError, ValueError) as exc:  # the load itself says what is wrong
                log.warning("no memory estimate for %s: %s", path, first_line(exc))
                return 0
            check_budget(found, self.memory_budget, f"model '{key.model}' at n_ctx={key.n_ctx}")
            estimate = self._estimates[key] = found.total_bytes
        if self.memory_budget is not None and estimate > self.memory_budget:
            from ml_engine.llm.memory_fit import format_bytes

            raise UserError(
                f"model '{key.model}' at n_ctx={key.n_ctx} needs an estimated "
                f"{format_bytes(estimate)}, more than llm.memory_budget="
                f"{format_bytes(self.memory_budget)}"
            )
        return estimate

    def _over_memory_budget(self, estimate: int) -> bool:
        """The loaded models' estimates and ``estimate`` together are past the budget."""
        if self.memory_budget is None:
            return False
        held = sum(e.estimate_bytes for e in self._loaded.values())
        return held + estimate > self.memory_budget

    def loaded_state(self) -> dict[str, dict[str, Any]]:
        """By model name: whether it is loaded now and its estimate (the largest of its
        loaded contexts, else of its default one when computed), for ``/v1/models``."""
        with self._cache_lock:
            entries = list(self._loaded.values())
            estimates = dict(self._estimates)
        state: dict[str, dict[str, Any]] = {}
        for key, size in estimates.items():
            state.setdefault(key.model, {"loaded": False, "memory_estimate_bytes": size})
        for entry in entries:
            if entry.key is not None and not entry.closed:
                state[entry.key.model] = {
                    "loaded": True,
                    "memory_estimate_bytes": entry.estimate_bytes or None,
                }
        return state

    def _unload_idle_loop(self) -> None:
        """Every so often, close the models no request used for ``idle_unload_s``; one in
        use (its lock held) is never touched."""
        assert self.idle_unload_s is not None
        period = min(1.0, max(0.05, self.idle_unload_s / 4))
        while not self._stopping.wait(period):
            self.unload_idle()

    def unload_idle(self) -> list[LlmKey]:
        """Close the models idle for ``idle_unload_s`` or longer; their keys."""
        if self.idle_unload_s is None:
            return []
        now, idle = time.monotonic(), []
        with self._cache_lock:
            for entry in list(self._loaded.values()):
                if now - entry.last_used < self.idle_unload_s:
                    continue
                if not entry.lock.acquire(blocking=False):  # serving a request: stays
                    continue
                del self._loaded[entry.key]
                entry.lock.release()
                idle.append(entry)
        for entry in idle:
            self._close(entry)
            self.idle_unloads += 1
            log.info("unloaded %s: idle for %g s", entry.key.model, self.idle_unload_s)
        return [entry.key for entry in idle]

    def _over_budget(self, keep: _Loaded) -> list[_Loaded]:
        """Least recently used entries to drop until the workers' resident memory fits
        ``llm.cache_mb``; ``keep`` (just loaded) stays even when alone over the budget."""
        if self.cache_bytes is None:
            return []
        sizes = {id(e): e.rss_bytes() for e in self._loaded.values()}
        total, evicted = sum(sizes.values()), []
        for entry in list(self._loaded.values()):
            if total <= self.cache_bytes:
                break
            if entry is not keep:
                del self._loaded[entry.key]
                evicted.append(entry)
                total -= sizes[id(entry)]
        return evicted

    def _close(self, loaded: _Loaded) -> None:
        with loaded.lock:  # waits for the request using it
            if loaded.closed:
                return
            loaded.closed = True
            loaded.backend.close()
        if isinstance(loaded.backend, LlmProcess):
            self._worker_gone()

    def worker_count(self) -> int:
        """Worker processes alive now (loading ones included)."""
        return self._live_workers

    def close(self, grace_s: float | None = None) -> None:
        """Close every worker; one still serving a request after ``grace_s`` is killed (the
        request sees a crash) rather than waited for."""
        self._stopping.set()
        with self._cache_lock:
            loaded, self._loaded = list(self._loaded.values()), OrderedDict()
        for entry in loaded:
            if grace_s is not None and not entry.lock.acquire(timeout=grace_s):
                kill = getattr(entry.backend, "kill", None)
                if kill is not None:
                    kill()
                entry.lock.acquire()
            elif grace_s is None:
                entry.lock.acquire()
            entry.lock.release()
            self._close(entry)

    # generation ------------------------------------------------------------------------------

    def request_options(self, loaded: _Loaded, key: LlmKey) -> dict[str, Any]:
        """What a worker needs beyond the sampling: the context the request asked for (a
        larger loaded one serves it as if it were that size)."""
        if not isinstance(loaded.backend, LlmProcess):
            return {}
        return {"n_ctx": self.resolve(key).n_ctx}

    def complete(
        self, key: LlmKey, prompt: str, sampling: dict[str, Any], cancel: Cancellation | None = None
    ) -> dict[str, Any]:
        """The whole completion; ``cancel`` stops it between two tokens (its client left), or
        before it starts (``ClientGone``)."""
        loaded = self.acquire(key)
        if cancel is not None and cancel.cancelled:
            self.release(loaded)
            raise ClientGone()
        return self._complete_loaded(loaded, key, prompt, sampling, cancel)

    def complete_now(
        self, key: LlmKey, prompt: str, sampling: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The mock backend's completion on the caller's thread (the event loop) when it is
        loaded and free, else None (then ``complete`` in a thread). Its work is microseconds:
        the hop to a worker thread and back cost more than the rest of the request."""
        if key.backend != "mock":  # the caller checked the model name (as for complete)
            return None
        with self._cache_lock:
            loaded = self._find(key)
        if loaded is None or not loaded.lock.acquire(blocking=False):  # never waits
            return None
        if loaded.closed:
            loaded.lock.release()
            return None
        return self._complete_loaded(loaded, key, prompt, sampling)

    def _complete_loaded(
        self,
        loaded: _Loaded,
        key: LlmKey,
        prompt: str,
        sampling: dict[str, Any],
        cancel: Cancellation | None = None,
    ) -> dict[str, Any]:
        """Complete on a backend whose lock is held; gives the lock back."""
        try:
            options = self.request_options(loaded, key)
            if cancel is not None and isinstance(loaded.backend, LlmProcess):
                options["cancel"] = cancel
            result = loaded.backend.complete(prompt, **sampling, **options)
            result["timings"] = finite_values(result.get("timings") or {})
            tokens = int(result.get("completion_tokens") or 0)
            self.metrics.generated(key.backend, tokens, result["timings"].get("gen_tokens_per_s"))
            return {**result, "engine": loaded.backend.name, "quantization": loaded.quantization}
        finally:
            self.release(loaded)

    def stream_loaded(
        self,
        loaded: _Loaded,
        prompt: str,
        sampling: dict[str, Any],
        key: LlmKey | None = None,
        cancel: Cancellation | None = None,
    ) -> TokenStream:
        """Stream from a backend taken with ``acquire``; the stream releases it when done.
        ``cancel`` stops the worker's generation between two tokens from any thread."""
        options = self.request_options(loaded, key or loaded.key)
        return TokenStream(self, loaded, prompt, {**sampling, **options}, cancel)


class TokenStream:
    """Events ``{"token": piece}`` … then ``{"done": True, ...}``.

    Holds the model's lock from creation until exhausted or closed, even if never iterated,
    so a client that disconnects early cannot leave the model locked.
    """

    def __init__(
        self,
        service: LlmService,
        loaded: _Loaded,
        prompt: str,
        sampling: dict[str, Any],
        cancel: Cancellation | None = None,
    ) -> None:
        self._service, self._loaded = service, loaded
        self._cancel = cancel
        self._events = self._generate(prompt, sampling)
        self.stats: dict[str, Any] | None = None  # a worker's counts once finished
        self._released = False
        self._release_lock = threading.Lock()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._events)
        except BaseException:
            self.close()
            raise

    def _generate(self, prompt: str, sampling: dict[str, Any]) -> Iterator[dict[str, Any]]:
        backend = self._loaded.backend
        started = time.perf_counter()
        pieces: list[str] = []
        first_at = None
        tokens = backend.stream(prompt, **sampling)
        stop = getattr(tokens, "cancel", None)
        if self._cancel is not None and stop is not None:
            self._cancel.on_cancel(stop)
        try:
            for piece in tokens:
                if first_at is None:
                    first_at = time.perf_counter() - started
                pieces.append(piece)
                yield {"token": piece}
        finally:
            # the backend's own generator ends before the next request may use the model (a
            # worker's generation is cancelled between two tokens)
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
            self.stats = getattr(tokens, "stats", None)
        elapsed = time.perf_counter() - started
        self._count(len(pieces), elapsed - (first_at or 0.0))
        self.close()
        yield {
            "done": True,
            "engine": backend.name,
            "quantization": self._loaded.quantization,
            "output": "".join(pieces),
            "pieces": len(pieces),
            "timings": {"ttft_s": round(first_at or elapsed, 4), "total_s": round(elapsed, 4)},
        }

    def _count(self, pieces: int, gen_s: float) -> None:
        """Tokens into /metrics: the worker's own count when it gives one (a piece of text
        may hold several tokens), else the pieces streamed."""
        tokens = int((self.stats or {}).get("completion_tokens") or pieces)
        rate = (tokens - 1) / gen_s if tokens > 1 and gen_s > 0 else None  # after the first
        backend = self._loaded.key.backend if self._loaded.key else "unknown"
        self._service.metrics.generated(backend, tokens, rate)

    def close(self) -> None:
        with self._release_lock:
            if self._released:
                return
            self._released = True
        # "generator already executing" (ValueError) when closed from inside its own step
        with contextlib.suppress(ValueError):
            self._events.close()
        self._service.release(self._loaded)

    def __del__(self) -> None:
        self.close()
