"""Quantization names and in-process quantization with llama.cpp, written atomically."""

from __future__ import annotations

import ctypes
from pathlib import Path

from ml_engine.errors import UnknownNameError, UserError
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
    source: Path, target: Path, quantization: str, n_threads: int | None = None
) -> Path:
    """Produce ``target`` at ``quantization`` from the higher-precision ``source`` in-process.

    Written to a temp file and renamed, so parallel jobs either see the whole file or none.
    """
    import llama_cpp

    check_quantization(quantization)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[quantization]
    params.nthread = n_threads or 0  # 0: llama.cpp uses all hardware threads
    with atomic_path(target) as tmp:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0 or not tmp.exists():
            raise UserError(
                f"could not produce {quantization} from {source}: llama.cpp's quantizer failed "
                "(is the source a complete, valid GGUF?)"
            )
    return target
