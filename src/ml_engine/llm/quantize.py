"""Quantization names and in-process quantization with llama.cpp, written atomically."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.llm import progress
from ml_engine.llm.llama_log import capture_llama_logs, installed_callback, llama_load_reason
from ml_engine.run.files import atomic_path

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


def quantize_gguf(
    source: Path,
    target: Path,
    quantization: str,
    n_threads: int | None = None,
    *,
    requantize: bool = False,
) -> Path:
    """Produce ``target`` at ``quantization`` from ``source`` in-process.

    ``source`` is f32/f16/bf16, or, with ``requantize``, an already-quantized file (llama.cpp
    refuses those otherwise). Written to a temp file and renamed, so parallel jobs either see the
    whole file or none.
    """
    import llama_cpp

    check_quantization(quantization)
    capture_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[quantization]
    params.nthread = n_threads or 0  # 0: llama.cpp uses all hardware threads
    params.allow_requantize = requantize
    label = f"quantizing {source.name} to {quantization}"
    with atomic_path(target) as tmp, _tensor_progress(label, source):
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0 or not tmp.exists():
            reason = llama_load_reason() or "no reason logged"
            raise UserError(
                f"could not produce {quantization} from {source}: llama.cpp's quantizer failed: "
                f"{reason}"
            )
    return target


# llama.cpp's quantizer logs "[  3/ 21] blk.0.attn_k.weight - [...]" as it starts each tensor
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


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
def _tensor_progress(label: str, source: Path) -> Iterator[None]:
    """Progress in tensors, read from the quantizer's own log lines (it has no callback); the
    lines still reach the log capture, which names what went wrong when quantizing fails."""
    import llama_cpp

    forward = installed_callback()
    with progress.phase(label, total=_tensor_count(source), unit="tensors") as shown:

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            started = _TENSOR_LINE.match(text.decode("utf-8", errors="replace"))
            if started:
                shown.set(int(started.group(1)) - 1)
            if forward is not None:
                forward(level, text, user_data)

        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield
            if shown.done:
                shown.set(shown.done + 1)
        finally:
            llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
