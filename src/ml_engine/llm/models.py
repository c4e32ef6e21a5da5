"""Where a model's GGUF file for a quantization lives, and how it gets there.

A model config (``conf/llm/model/<name>.yaml``) names its file per quantization under
``paths.models_dir``. Resolution order: the file on disk → (embedded tiny) written on first use →
produced from a higher-precision file on disk → downloaded, only when the user allows it →
otherwise one line naming the path looked at and how to obtain the file.

``llm.model.path`` set makes the model the file at that path instead: its name and quantization
are read from its GGUF metadata, and other quantizations are produced from it into
``paths.models_dir`` (the file's own folder may be read-only or shared, e.g. a Hugging Face cache
or a training run's export; a derived file is cache data like ``models/.quality``), named after
the file and its identity (path, size, modification time), so a re-exported file never reuses a
stale quantization. Only an f32/f16/bf16 file is quantized; an already-quantized one only with
``llm.allow_requantize=true``, and what comes of it is labelled requantized.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.llama_log import capture_llama_logs, llama_load_reason, load_failure, load_report
from ml_engine.llm.quantize import (
    QUANTIZATIONS,
    SOURCE_PRECISIONS,
    check_quantization,
    file_type_name,
    gains_precision,
    is_float,
    precision_rank,
    quantize_gguf,
)
from ml_engine.llm.variants import Variant
from ml_engine.run.locations import CONFIG_DIR, install_command

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
# a GGUF shipped with the package (models_data/), served as a given file is
PACKAGED = "packaged"
PACKAGED_DIR = Path(__file__).parent / "models_data"
# the source of a model given as llm.model.path
FILE = "file"
# llm.quantization when neither it nor llm.model.default_quantization is given
DEFAULT_QUANTIZATION = "q4_k_m"


@dataclass(frozen=True)
class ModelFile:
    """A resolved model file and its origin: on_disk, given, written, quantized_from_*,
    requantized_from_*, downloaded. ``requantized``: produced from an already-quantized file
    (now or by an earlier run)."""

    path: Path
    quantization: str
    origin: str
    requantized: bool = False


@dataclass(frozen=True)
class GgufFacts:
    """What a GGUF says about itself, read from its header without touching the weights."""

    name: str | None
    quantization: str
    architecture: str | None
    has_chat_template: bool
    context_length: int | None = None  # the context it was trained on (<arch>.context_length)


def read_gguf_facts(path: Path) -> GgufFacts:
    """``general.name``, ``general.file_type`` (as our quantization name, or llama.cpp's for the
    types we do not produce), ``general.architecture`` and whether a chat template is stored.
    Raises ``OSError`` for a file that cannot be opened, ``ValueError`` saying in one line what
    is wrong with one that is no readable GGUF."""
    info = Path(path).stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")  # never opened: a FIFO would block the reader
    _check_header(Path(path), info.st_size)
    try:
        return _read_gguf_facts(str(Path(path).resolve()), info.st_size, info.st_mtime_ns)
    except IndexError:  # the reader's arrays ended: an entry runs past the end of the file
        raise ValueError(
            f"corrupt or truncated GGUF: its metadata runs past the end of its {info.st_size} bytes"
        ) from None
    except (ValueError, KeyError, OverflowError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"corrupt or truncated GGUF ({reason})") from None


# what llama.cpp reads (gguf.cpp): the magic, then a little-endian version 2 or 3
_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
# the fewest bytes a metadata entry (key length, 1-byte key, type, 1-byte value) and a tensor's
# description (name length, 1-byte name, n_dims, one dimension, type, offset) take
_MIN_ENTRY_BYTES, _MIN_TENSOR_BYTES = 14, 33


def _check_header(path: Path, size: int) -> None:
    """The fixed header checked by hand, so that the common faults read as llama.cpp says them
    rather than as a reader's index error deep in a loop over counts the file cannot hold."""
    if size == 0:
        raise ValueError("the file is empty")
    with path.open("rb") as file:
        head = file.read(24)
    if head[:4] != _GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (it starts with {head[:4]!r}, a GGUF with b'GGUF')")
    if len(head) < 24:
        raise ValueError(f"truncated GGUF: {size} bytes, less than its 24-byte header")
    version, tensors, entries = struct.unpack("<IQQ", head[4:])
    if version and version & 0xFFFF == 0:  # llama.cpp: "for big-endian machines"
        raise ValueError("a big-endian GGUF; llama.cpp reads little-endian ones here")
    if version not in _GGUF_VERSIONS:
        readable = " and ".join(map(str, _GGUF_VERSIONS))
        raise ValueError(f"GGUF version {version}; llama.cpp reads versions {readable}")
    if entries * _MIN_ENTRY_BYTES + tensors * _MIN_TENSOR_BYTES > size:
        raise ValueError(
            f"corrupt or truncated GGUF: its header counts {entries} metadata entries and "
            f"{tensors} tensors, more than its {size} bytes can hold"
        )


def probe_gguf(path: Path) -> None:
    """Let llama.cpp read the file's metadata and vocabulary only (no weights; a fraction of a
    second even for a 7B file): a file it cannot use fails here in one line, before any
    quantization starts from it."""
    import llama_cpp

    capture_llama_logs()
    with load_report():
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise UserError(load_failure(Path(path), llama_load_reason()))
    llama_cpp.llama_model_free(model)


def file_problem(model_cfg: Mapping[str, Any]) -> str | None:
    """Why the file of ``llm.model.path`` is no GGUF this process can read, in one line that
    names it; None when it reads, or when the model is not a file."""
    if not is_file_model(model_cfg):
        return None
    path = given_file(model_cfg)
    try:
        read_gguf_facts(path)
    except OSError as error:
        return f"{path} cannot be read: {error.strerror or error}"
    except ValueError as error:
        return f"{path}: {error}"
    return None


@functools.lru_cache(maxsize=32)
def _read_gguf_facts(path: str, size: int, mtime_ns: int) -> GgufFacts:
    from gguf import GGUFReader

    reader = GGUFReader(path)  # memory-maps the file; the weights are not read

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    file_type = value("general.file_type")
    architecture = value("general.architecture")
    context_length = value(f"{architecture}.context_length") if architecture else None
    quantization = (
        file_type_name(int(file_type)) if file_type is not None else _guess_file_type(reader)
    )
    return GgufFacts(
        name=value("general.name") or None,
        quantization=quantization,
        architecture=architecture,
        has_chat_template="tokenizer.chat_template" in reader.fields,
        context_length=int(context_length) if context_length is not None else None,
    )


def _guess_file_type(reader: Any) -> str:
    """Without ``general.file_type``: the type holding most of the matrices' weights, as
    llama.cpp guesses it (a K-quant mix cannot be told apart from its main type)."""
    weights: dict[str, int] = {}
    for tensor in reader.tensors:
        if len(tensor.shape) > 1:
            name = tensor.tensor_type.name.lower()
            weights[name] = weights.get(name, 0) + int(tensor.n_elements)
    return max(weights, key=weights.__getitem__) if weights else "unknown"


def is_file_model(model_cfg: Mapping[str, Any]) -> bool:
    return bool(model_cfg.get("path")) or model_cfg.get("source") == PACKAGED


def _no_file_message(model_cfg: Mapping[str, Any]) -> str:
    if model_cfg.get("path"):
        return f"llm.model.path={model_cfg['path']}: no such file (expected a .gguf)"
    # a packaged file missing: an install that left out the package data (or a checkout before
    # the file was built): the random tiny model still runs
    return (
        f"{given_file(model_cfg)}: the packaged model {model_cfg.get('name')!r} is missing from "
        "this install; reinstall ml-engine, or run llm/model=tiny (random weights)"
    )


def given_file(model_cfg: Mapping[str, Any]) -> Path:
    """The file of a file model: ``llm.model.path`` when given (it replaces a packaged model's
    own file, as it replaces any selected model), else the packaged file."""
    if model_cfg.get("path"):
        return Path(str(model_cfg["path"])).expanduser()
    return PACKAGED_DIR / str(model_cfg["file"])


def _own_quantization(source: Path) -> str | None:
    try:
        return read_gguf_facts(source).quantization
    except (OSError, ValueError, KeyError, IndexError):
        return None


def file_model_node(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``llm.model`` node of ``llm.model.path``: the file's name (``general.name``, else its
    stem) and own quantization, the selected model's ``chat_template``/``ignore_eos``.

    An unreadable file keeps its stem and no quantization: the model worker then lets llama.cpp
    say what is wrong with it.
    """
    path = given_file(model_cfg)
    if not path.is_file():
        raise UserError(_no_file_message(model_cfg))
    try:
        facts: GgufFacts | None = read_gguf_facts(path)
    except (OSError, ValueError, KeyError, IndexError):
        facts = None
    return {
        # a packaged model keeps its config's name (llm/model=shakespeare), a given file its own
        "name": (
            str(model_cfg["name"])
            if not model_cfg.get("path")
            else (facts.name if facts else None) or path.stem
        ),
        "source": FILE,
        # the packaged file used in place: runs name it by its model name, not its path
        "packaged": not model_cfg.get("path") and model_cfg.get("source") == PACKAGED,
        "path": str(path.resolve()),
        # llm.quantization follows it unless one is named
        "default_quantization": facts.quantization if facts else None,
        "architecture": facts.architecture if facts else None,
        "chat_template": bool(model_cfg.get("chat_template", False)),
        "ignore_eos": bool(model_cfg.get("ignore_eos", False)),
    }


def default_quantization(model_cfg: Mapping[str, Any]) -> str | None:
    """The quantization run when none is named: the given file's own, else the config's."""
    if is_file_model(model_cfg):
        return _own_quantization(given_file(model_cfg))
    return str(model_cfg.get("default_quantization") or DEFAULT_QUANTIZATION)


def _identity(source: Path) -> str:
    stat = source.stat()
    text = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _derived_path(source: Path, quantization: str, models_dir: Path) -> Path:
    return Path(models_dir) / f"{source.stem}-{_identity(source)}-{quantization}.gguf"


def model_names() -> list[str]:
    """The configured models: the names of ``conf/llm/model/*.yaml``."""
    return sorted(path.stem for path in (CONFIG_DIR / "llm" / "model").glob("*.yaml"))


def _file_name(model_cfg: Mapping[str, Any], quantization: str) -> str:
    if model_cfg.get("source") == EMBEDDED:
        from ml_engine.llm.gguf_writer import shape_from_mapping

        shape = shape_from_mapping(model_cfg["shape"])
        seed = model_cfg.get("seed", 0)
        return f"{model_cfg['name']}-{shape.tag()}-s{seed}-{quantization}.gguf"
    # Published GGUF repos spell K-quants upper case and float types lower case (Q4_K_M, f16).
    upper = quantization if quantization in SOURCE_PRECISIONS else quantization.upper()
    return str(model_cfg["file"]).format(quantization=quantization, QUANT=upper)


def model_path(model_cfg: Mapping[str, Any], quantization: str, models_dir: Path) -> Path:
    """Where ``quantization`` of this model is looked for (and written to)."""
    if is_file_model(model_cfg):
        source = given_file(model_cfg)
        if quantization == _own_quantization(source):
            return source
        return _derived_path(source, check_quantization(quantization), models_dir)
    return Path(models_dir) / _file_name(model_cfg, check_quantization(quantization))


def available_quantizations(model_cfg: Mapping[str, Any], models_dir: Path) -> list[str]:
    """The quantizations of this model present on disk, most precise first (a given file's own
    first: it is what the others are made from)."""
    if is_file_model(model_cfg):
        own = _own_quantization(given_file(model_cfg))
        derived = [q for q in QUANTIZATIONS if q != own]
        present = [q for q in derived if model_path(model_cfg, q, models_dir).is_file()]
        return ([own] if own else []) + present
    return [q for q in QUANTIZATIONS if model_path(model_cfg, q, models_dir).is_file()]


def base_quantization(model_cfg: Mapping[str, Any], models_dir: Path) -> str | None:
    """The reference for the KL-divergence statistics: the most precise quantization on disk,
    or a given file itself (every other quantization of it is made from it)."""
    present = available_quantizations(model_cfg, models_dir)
    return present[0] if present else None


def ensure_model_file(
    model_cfg: Mapping[str, Any],
    quantization: str | None,
    models_dir: Path,
    *,
    allow_download: bool = False,
    allow_requantize: bool = False,
    n_threads: int | None = None,
    variant: Variant | None = None,
) -> ModelFile:
    """The model's file at ``quantization`` (None: its default), producing it when it can (see
    module docstring). ``variant``: an importance matrix and per-tensor types the file is made
    with (a file of its own beside the plain one; ignored for float types)."""
    models_dir = Path(models_dir)
    if is_file_model(model_cfg):
        return _ensure_from_file(
            model_cfg, quantization, models_dir, allow_requantize, n_threads, variant
        )
    quantization = quantization or default_quantization(model_cfg)
    variant = _applicable(variant, quantization)
    target = variant.path_for(model_path(model_cfg, quantization, models_dir))
    if target.is_file():
        return ModelFile(target, quantization, "on_disk")
    if model_cfg.get("source") == EMBEDDED:
        base = _write_embedded(model_cfg, models_dir)
        if base.quantization == quantization:
            return base
    source = _higher_precision_source(model_cfg, quantization, models_dir)
    if source is not None:
        log.info("producing %s from %s", target.name, source.name)
        quantize_gguf(source, target, quantization, n_threads, **variant.quantize_kwargs())
        return ModelFile(target, quantization, f"quantized_from_{_quant_of(model_cfg, source)}")
    if not variant.is_plain:
        raise UserError(
            f"{target.name} is made with an importance matrix or per-tensor types from an "
            f"f32/f16/bf16 file of {model_cfg.get('name')}, and none is in {models_dir}"
        )
    if allow_download and model_cfg.get("repo_id"):
        return ModelFile(_download(model_cfg, quantization, models_dir), quantization, "downloaded")
    raise UserError(_missing_file_message(model_cfg, quantization, target, models_dir))


def _ensure_from_file(
    model_cfg: Mapping[str, Any],
    quantization: str | None,
    models_dir: Path,
    allow_requantize: bool,
    n_threads: int | None,
    variant: Variant | None = None,
) -> ModelFile:
    source = given_file(model_cfg)
    if not source.is_file():
        raise UserError(_no_file_message(model_cfg))
    probe_gguf(source)  # not a GGUF, truncated, unknown architecture: llama.cpp's reason
    own = read_gguf_facts(source).quantization
    if quantization is None or quantization == own:
        return ModelFile(source, own, "given")
    check_quantization(quantization)
    if gains_precision(quantization, own):
        raise UserError(
            f"llm.quantization={quantization} would hold more than {source} ({own}) does: "
            f"quantizing cannot restore lost precision; run {own} or a smaller quantization"
        )
    requantize = not is_float(own)
    if requantize and not allow_requantize:
        raise UserError(
            f"{source} is already quantized ({own}); {quantization} made from it is quantized "
            "twice, worse than from the f32/f16/bf16 original: give that original as "
            "llm.model.path, or set llm.allow_requantize=true (such rows are labelled "
            "requantized)"
        )
    variant = _applicable(variant, quantization)
    target = variant.path_for(_derived_path(source, quantization, models_dir))
    if target.is_file():
        return ModelFile(target, quantization, "on_disk", requantized=requantize)
    log.info("producing %s from %s (%s)", target.name, source, own)
    quantize_gguf(
        source, target, quantization, n_threads, requantize=requantize, **variant.quantize_kwargs()
    )
    verb = "requantized" if requantize else "quantized"
    return ModelFile(target, quantization, f"{verb}_from_{own}", requantized=requantize)


def _applicable(variant: Variant | None, quantization: str) -> Variant:
    """A float file is written as it is: no matrix or tensor type applies to it."""
    if variant is None or is_float(quantization):
        return Variant()
    return variant


def float_source(model_cfg: Mapping[str, Any], quantization: str, models_dir: Path) -> Path | None:
    """The f32/f16/bf16 file ``quantization`` of this model is (or would be) made from: a
    given float file itself, else the most precise float file on disk; None when there is none
    (a quantized given file, a model with only quantized downloads)."""
    if is_file_model(model_cfg):
        source = given_file(model_cfg)
        own = _own_quantization(source) if source.is_file() else None
        return source if own is not None and is_float(own) else None
    return _higher_precision_source(model_cfg, quantization, Path(models_dir))


def _quant_of(model_cfg: Mapping[str, Any], path: Path) -> str:
    return next(q for q in QUANTIZATIONS if _file_name(model_cfg, q) == path.name)


def _write_embedded(model_cfg: Mapping[str, Any], models_dir: Path) -> ModelFile:
    from ml_engine.llm.gguf_writer import shape_from_mapping, write_random_llama

    quantization = model_cfg.get("base_quantization", "f32")
    path = model_path(model_cfg, quantization, models_dir)
    if path.is_file():
        return ModelFile(path, quantization, "on_disk")
    shape = shape_from_mapping(model_cfg["shape"])
    log.info(
        "writing the embedded %s model (%d parameters) to %s",
        model_cfg["name"],
        shape.n_params,
        path,
    )
    write_random_llama(
        path,
        shape,
        seed=int(model_cfg.get("seed", 0)),
        name=str(model_cfg["name"]),
        file_type=quantization,
    )
    return ModelFile(path, quantization, "written")


def _higher_precision_source(
    model_cfg: Mapping[str, Any], quantization: str, models_dir: Path
) -> Path | None:
    """The most precise f32/f16/bf16 file on disk that is at least as precise as the target."""
    for candidate in SOURCE_PRECISIONS:
        if candidate == quantization or precision_rank(candidate) > precision_rank(quantization):
            continue
        path = model_path(model_cfg, candidate, models_dir)
        if path.is_file():
            return path
    return None


def _download(model_cfg: Mapping[str, Any], quantization: str, models_dir: Path) -> Path:
    offered = list(model_cfg.get("downloadable") or [])
    if offered and quantization not in offered:
        raise UserError(
            f"{model_cfg['repo_id']} does not publish {quantization}; downloadable: "
            f"{', '.join(offered)} (others are produced locally from f16/bf16/f32)"
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise UserError(
            f"llm.allow_download=true needs huggingface_hub: {install_command('hub')}"
        ) from exc
    name = _file_name(model_cfg, quantization)
    # hf_hub_download writes into a temp name and renames: no half files under models_dir.
    return Path(hf_hub_download(repo_id=model_cfg["repo_id"], filename=name, local_dir=models_dir))


# huggingface_hub's CLI is `hf` since 0.34; `huggingface-cli` before (deprecated after)
HF_CLI_SINCE = "0.34"


def installed_hub_version() -> str | None:
    try:
        return importlib.metadata.version("huggingface_hub")
    except importlib.metadata.PackageNotFoundError:
        return None


def download_command(repo: str, filename: str, local_dir: Path, hub_version: str | None) -> str:
    """The command that fetches one model file with the huggingface_hub CLI installed here
    (``hub_version``), or how to install it first when it is not (None)."""
    from packaging.version import Version

    args = f"download {repo} {filename} --local-dir {local_dir}"
    if hub_version is None:
        return f"`{install_command('hub')}` then `hf {args}`"
    cli = "hf" if Version(hub_version) >= Version(HF_CLI_SINCE) else "huggingface-cli"
    return f"`{cli} {args}`"


def _missing_file_message(
    model_cfg: Mapping[str, Any], quantization: str, target: Path, models_dir: Path
) -> str:
    name = model_cfg.get("name", "?")
    message = f"model file not found: {target} ({name} {quantization})"
    repo = model_cfg.get("repo_id")
    if repo:
        fetch = download_command(repo, target.name, models_dir, installed_hub_version())
        message += f"; get it with {fetch} or rerun with llm.allow_download=true"
    sources = ", ".join(str(model_path(model_cfg, q, models_dir).name) for q in SOURCE_PRECISIONS)
    return message + f"; or place one of {sources} in {models_dir} to quantize locally"
