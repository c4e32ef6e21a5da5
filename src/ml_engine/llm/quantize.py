"""Quantization names and in-process quantization with llama.cpp, written atomically.

``quantize_gguf`` calls llama.cpp's own ``llama_model_quantize`` with the parameters
``llama-quantize`` builds (``tools/quantize/quantize.cpp``): an importance matrix as
``params.imatrix`` (each tensor's mean squared activations, which llama.cpp hands to
``ggml_quantize_chunk``) with the ``quantize.imatrix.*`` metadata, and per-tensor types as
``params.tt_overrides`` (``--tensor-type PATTERN=TYPE``). The bytes are llama.cpp's: the same
call as ``llama-quantize [--imatrix F] [--tensor-type P=T]... SRC DST TYPE`` makes the same file.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.llm import progress
from ml_engine.llm.llama_log import capture_llama_logs, installed_callback, llama_load_reason
from ml_engine.run.files import atomic_path

if TYPE_CHECKING:
    from ml_engine.llm.imatrix import ImportanceMatrix

# Name → llama_ftype (llama.h), highest precision first: this order is also the order in which
# a "base" file is chosen for quality comparisons.
QUANTIZATIONS: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "bf16": 32,
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q4_k_m": 15,
    "q4_k_s": 14,
    "q4_0": 2,
    "q3_k_m": 12,
    "q2_k": 10,
}
# Files that other quantizations can be produced from.
SOURCE_PRECISIONS: tuple[str, ...] = ("f32", "f16", "bf16")
_FLOAT_BITS = {"f32": 32, "f16": 16, "bf16": 16}

# Per-tensor types: name → ggml_type (ggml.h), the names llama-quantize's --tensor-type accepts
# (ggml_type_name in lower case; it compares without case, so do we), highest precision first.
# Its parser takes any ggml type name; the ones left out here (i8…i64, f64, q8_1, q8_k) are not
# storage types ggml_quantize_chunk can produce: asked for one, ggml aborts the process.
TENSOR_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "bf16": 30,
    "q8_0": 8,
    "q6_k": 14,
    "q5_k": 13,
    "q5_1": 7,
    "q5_0": 6,
    "q4_k": 12,
    "q4_1": 3,
    "q4_0": 2,
    "iq4_nl": 20,
    "iq4_xs": 23,
    "mxfp4": 39,
    "nvfp4": 40,
    "q3_k": 11,
    "iq3_s": 21,
    "iq3_xxs": 18,
    "q2_k": 10,
    "iq2_s": 22,
    "iq2_xs": 17,
    "iq2_xxs": 16,
    "q2_0": 42,
    "tq2_0": 35,
    "iq1_m": 29,
    "iq1_s": 19,
    "tq1_0": 34,
    "q1_0": 41,
}


_GGML_TYPE_COUNT = 43  # ggml.h; ends the tt_overrides array


def file_type_name(ftype: int) -> str:
    """Our name for a GGUF's ``general.file_type`` (a llama_ftype), else llama.cpp's own in lower
    case (``iq4_xs``, ``q5_0``): a file of a type we do not produce can still be run as it is."""
    import gguf

    ours = {value: name for name, value in QUANTIZATIONS.items()}
    if ftype in ours:
        return ours[ftype]
    try:
        member = gguf.LlamaFileType(ftype)
    except ValueError:
        return f"ftype_{ftype}"
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def is_float(name: str) -> bool:
    return name in _FLOAT_BITS


def gains_precision(target: str, source: str) -> bool:
    """``target`` would hold more than ``source`` does: a float type from a quantized file, or
    f32 from a 16-bit one. Converting cannot restore what the source has lost."""
    if not is_float(target):
        return False
    return not is_float(source) or _FLOAT_BITS[target] > _FLOAT_BITS[source]


def quantization_names() -> list[str]:
    return list(QUANTIZATIONS)


def check_quantization(name: str) -> str:
    """``name`` if supported, else an error listing the supported names in precision order."""
    if name not in QUANTIZATIONS:
        raise UnknownNameError("quantization", str(name), quantization_names())
    return name


def precision_rank(name: str) -> int:
    """0 for the most precise; lower rank = more precise."""
    return list(QUANTIZATIONS).index(check_quantization(name))


def check_tensor_types(mapping: Mapping[str, str]) -> dict[str, int]:
    """``{pattern: type name}`` → ``{pattern: ggml_type}``, in the given order (the first pattern
    that matches a tensor decides, as in llama.cpp). A pattern is a regular expression searched
    anywhere in a tensor's name (llama.cpp: ``std::regex_search``, ECMAScript syntax), so
    ``attn_v`` means every layer's ``blk.N.attn_v.weight``, ``output.weight`` also selects
    ``blk.N.attn_output.weight`` (as with llama-quantize) and ``^output\\.weight$`` is that tensor
    alone. It is used as written (llama-quantize lower-cases it first; tensor names are lower
    case). A type name that does not exist, an empty pattern or one that is not a regular
    expression is one line (checked with Python's ``re``; a pattern only C++'s regex refuses
    is llama.cpp's own one line).
    """
    checked: dict[str, int] = {}
    for pattern, type_name in mapping.items():
        pattern = str(pattern)
        if not pattern:
            raise UserError(f"empty tensor pattern for type '{type_name}'")
        key = str(type_name).strip().lower()
        if key not in TENSOR_TYPES:
            raise UserError(
                f"unknown tensor type '{type_name}' for pattern '{pattern}'; accepted: "
                f"{', '.join(TENSOR_TYPES)}"
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(
                f"tensor pattern '{pattern}' is not a regular expression: {exc}"
            ) from None
        checked[pattern] = TENSOR_TYPES[key]
    return checked


def tensor_types_of(path: Path) -> dict[str, str]:
    """Every tensor of a GGUF and its ggml type name in lower case (``q4_k``, ``f32``), in file
    order, read from the header by the gguf package."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name.lower() for t in reader.tensors}


def bits_per_weight(path: Path) -> float:
    """Bits per weight as llama.cpp prints it ("file size = … (4.87 BPW)"): the bytes of all
    tensor data × 8 over the number of elements of all tensors (norms included; metadata and
    padding are not counted)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elements = sum(int(t.n_elements) for t in reader.tensors)
    return n_bytes * 8 / n_elements if n_elements else 0.0


def quantize_gguf(
    source: Path,
    target: Path,
    quantization: str,
    n_threads: int | None = None,
    *,
    requantize: bool = False,
    imatrix: ImportanceMatrix | None = None,
    imatrix_label: str = "",
    tensor_types: Mapping[str, str] | None = None,
) -> Path:
    """Produce ``target`` at ``quantization`` from ``source`` in-process.

    ``source`` is f32/f16/bf16, or, with ``requantize``, an already-quantized file (llama.cpp
    refuses those otherwise). Written to a temp file and renamed, so parallel jobs either see the
    whole file or none.

    ``imatrix``: an importance matrix for ``source`` (checked against its weight matrices),
    handed to llama.cpp's quantizer as llama-quantize's ``--imatrix`` does, and recorded in the
    file's metadata (``quantize.imatrix.file`` = ``imatrix_label``, ``.dataset``,
    ``.entries_count``, ``.chunks_count``). ``tensor_types``: ``{pattern: type}`` as
    llama-quantize's ``--tensor-type pattern=type`` (see ``check_tensor_types``); each pattern
    must match a weight matrix of ``source``, and the target must be a quantized type (llama.cpp
    ignores the map for f32/f16/bf16).
    """
    import llama_cpp

    check_quantization(quantization)
    overrides = check_tensor_types(tensor_types or {})
    if overrides and is_float(quantization):
        raise UserError(
            f"tensor types apply to quantized targets only; llama.cpp ignores them for "
            f"{quantization}"
        )
    if imatrix is not None or overrides:
        weights = _weight_columns(source)
        if imatrix is not None:
            from ml_engine.llm.imatrix import check_matches_model

            check_matches_model(imatrix, weights, imatrix_label or "given")
        _check_patterns_match(overrides, weights, source)
    capture_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[quantization]
    params.nthread = n_threads or 0  # 0: llama.cpp uses all hardware threads
    params.allow_requantize = requantize
    # the arrays llama.cpp reads during the call; referenced here until it returns
    keep_alive: list[object] = []
    if imatrix is not None:
        recorded = str(imatrix_label or "")
        params.imatrix, params.kv_overrides = _imatrix_arrays(imatrix, recorded, keep_alive)
    if overrides:
        params.tt_overrides = _override_array(overrides, keep_alive)
    label = f"quantizing {source.name} to {quantization}"
    with atomic_path(target) as tmp, _tensor_progress(label, source) as failures:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0 or not tmp.exists():
            reason = (failures[-1] if failures else "") or llama_load_reason()
            reason = reason or "no reason logged"
            raise UserError(
                f"could not produce {quantization} from {source}: llama.cpp's quantizer failed: "
                f"{reason}"
            )
    return target


def _weight_columns(source: Path) -> dict[str, int]:
    """The source's weight matrices and their widths; an unreadable source is one line."""
    from ml_engine.llm.imatrix import model_columns

    source = Path(source)
    if not source.is_file():
        raise UserError(f"could not quantize {source}: no such file")
    try:
        return model_columns(source)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"could not quantize {source}: not a readable GGUF ({first})") from None


def _check_patterns_match(overrides: Mapping[str, int], weights: Mapping[str, int], source) -> None:
    """One line for a pattern that selects none of the model's weight matrices (llama-quantize
    ignores it; here it is surely a typo)."""
    for pattern in overrides:
        compiled = re.compile(pattern)
        if not any(compiled.search(name) for name in weights):
            kinds = sorted({re.sub(r"^blk\.\d+\.", "blk.N.", name) for name in weights})
            raise UserError(
                f"tensor pattern '{pattern}' matches no weight matrix of {Path(source).name}; "
                f"its matrices: {', '.join(kinds)}"
            )


def _imatrix_arrays(matrix: ImportanceMatrix, label: str, keep_alive: list[object]):
    """``params.imatrix`` (name, means, size per tensor, then a NULL name) and
    ``params.kv_overrides`` (what llama-quantize records, then an empty key), as quantize.cpp
    builds them."""
    import llama_cpp
    import numpy as np

    from ml_engine.llm.imatrix import (
        KEY_QUANTIZE_CHUNKS,
        KEY_QUANTIZE_DATASET,
        KEY_QUANTIZE_ENTRIES,
        KEY_QUANTIZE_FILE,
    )

    means = {
        name: np.ascontiguousarray(entry.means(), dtype=np.float32)
        for name, entry in sorted(matrix.entries.items())
    }
    entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for slot, (name, values) in zip(entries[: len(means)], means.items(), strict=True):
        encoded = name.encode()
        keep_alive.extend((encoded, values))
        slot.name = encoded
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    # the last slot stays zeroed: name NULL ends the array
    records: list[tuple[str, str | int]] = [(KEY_QUANTIZE_FILE, label)]
    if matrix.datasets:
        records.append((KEY_QUANTIZE_DATASET, matrix.datasets[0]))
    records.append((KEY_QUANTIZE_ENTRIES, len(means)))
    if matrix.chunk_count > 0:
        records.append((KEY_QUANTIZE_CHUNKS, int(matrix.chunk_count)))
    kv = (llama_cpp.llama_model_kv_override * (len(records) + 1))()
    for slot, (key, value) in zip(kv[: len(records)], records, strict=True):
        slot.key = key.encode()
        if isinstance(value, str):
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            slot.value.val_str = value.encode()[:127]  # char[128], cut as llama-quantize does
        else:
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            slot.value.val_i64 = value
    keep_alive.extend((entries, kv))
    return entries, kv


def _override_array(overrides: Mapping[str, int], keep_alive: list[object]):
    """``params.tt_overrides``: (pattern, ggml_type) per entry, then {NULL, GGML_TYPE_COUNT}."""
    import llama_cpp

    array = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for slot, (pattern, ggml_type) in zip(array[: len(overrides)], overrides.items(), strict=True):
        encoded = pattern.encode()
        keep_alive.append(encoded)
        slot.pattern = encoded
        slot.type = ggml_type
    array[len(overrides)].type = _GGML_TYPE_COUNT
    keep_alive.append(array)
    return array


# llama.cpp's quantizer logs "[  3/ 21] blk.0.attn_k.weight - [...]" as it starts each tensor
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
# and "llama_model_quantize: failed to quantize: <why>" when it gives up (a bad regex, a
# non-finite importance value, an imatrix of the wrong size)
_FAILED = "failed to quantize: "


def _tensor_count(path: Path) -> int | None:
    """The GGUF header's tensor count (magic, version, then the count as a little-endian u64);
    None where the header is not readable: the quantizer says what is wrong."""
    try:
        with Path(path).open("rb") as handle:
            header = handle.read(16)
    except OSError:
        return None
    if len(header) < 16 or header[:4] != b"GGUF":
        return None
    return int.from_bytes(header[8:16], "little") or None


@contextmanager
def _tensor_progress(label: str, source: Path) -> Iterator[list[str]]:
    """Progress in tensors, read from the quantizer's own log lines (it has no callback); the
    lines still reach the log capture, which names what went wrong when quantizing fails.
    Yields the quantizer's own failure reasons as it logs them."""
    import llama_cpp

    forward = installed_callback()
    failures: list[str] = []
    with progress.phase(label, total=_tensor_count(source), unit="tensors") as shown:

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", errors="replace")
            started = _TENSOR_LINE.match(line)
            if started:
                shown.set(int(started.group(1)) - 1)
            elif _FAILED in line:
                failures.append(line.split(_FAILED, 1)[1].strip().split("\n")[0])
            if forward is not None:
                forward(level, text, user_data)

        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield failures
            if shown.done:
                shown.set(shown.done + 1)
        finally:
            llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
