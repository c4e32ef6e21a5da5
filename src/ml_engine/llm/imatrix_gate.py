"""``quantize.imatrix=auto|none|<file>``: which importance matrix a quantized file is made with,
and, with ``auto``, whether it is made with one at all.

An importance matrix usually lowers a low-bit file's error, and sometimes raises it (llama.cpp's
reported Q2_K regression). With ``auto`` the file is therefore made both ways, each is compared
with the model's base file on the quality text as ``llama-perplexity --kl-divergence`` compares
them (``quality.evaluate_quality``), and the one with the lower mean KLD is kept; the record
holds both measurements, so the sweep summary and ``summary.png`` show what was given up.

Where ``auto`` finds a matrix: beside the float file the quantization is made from, as
``<stem>.imatrix.gguf`` (export.py writes it from the training split; the packaged model has
one), else computed by llama.cpp's forward pass on ``quantize.calibration_text`` (cached under
``<models_dir>/.imatrix/``). Without either, the file is made plain and the record says why.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.imatrix import (
    MATRIX_SUFFIX,
    ImportanceMatrix,
    check_matches_model,
    matrix_beside,
    model_columns,
    read_imatrix,
    write_imatrix,
)
from ml_engine.llm.models import (
    ModelFile,
    base_quantization,
    ensure_model_file,
    float_source,
    model_path,
)
from ml_engine.llm.quality import QualitySettings, evaluate_quality
from ml_engine.llm.quantize import is_float
from ml_engine.llm.variants import Variant, file_digest, tensor_types_of

log = logging.getLogger(__name__)

AUTO, NONE = "auto", "none"
CALIBRATION_DIR = ".imatrix"
# the figures kept per candidate in the record (and shown in the sweep summary)
KEPT_FIGURES = ("kl_mean", "kl_mean_unc", "top1_agreement", "top1_agreement_unc", "kl_p99")


def check_setting(value: Any) -> str:
    """``auto``, ``none`` or the path of an existing file; anything else is one line."""
    if value is None or value is False:
        return NONE
    text = str(value)
    if text in (AUTO, NONE):
        return text
    if not Path(text).expanduser().is_file():
        raise UserError(
            f"quantize.imatrix={text}: no such file; accepted: auto, none, or the path of an "
            "importance matrix (llama-imatrix's or export.py's .gguf)"
        )
    return str(Path(text).expanduser())


def load_matrix(path: Path, source: Path) -> tuple[ImportanceMatrix, str]:
    """The matrix in ``path``, checked against the model in ``source``; with its digest."""
    matrix = read_imatrix(path)
    check_matches_model(matrix, model_columns(source), str(path))
    return matrix, file_digest(path)


def calibration_matrix(
    source: Path, quantize_node: Mapping[str, Any], models_dir: Path, n_threads: int | None
) -> Path | None:
    """The matrix llama.cpp computes for ``source`` on ``quantize.calibration_text`` (None when
    no text is given), cached by file identity, text and chunking."""
    text_path = quantize_node.get("calibration_text")
    if not text_path:
        return None
    path = Path(str(text_path)).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"quantize.calibration_text={text_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"quantize.calibration_text={text_path} is not UTF-8 text: {exc}") from None
    n_ctx = int(quantize_node.get("calibration_n_ctx") or 128)
    n_chunks = int(quantize_node.get("calibration_chunks") or 64)
    stat = source.stat()
    key = hashlib.sha1(
        f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{n_ctx}|{n_chunks}|".encode()
        + text.encode()
    ).hexdigest()[:16]
    cached = Path(models_dir) / CALIBRATION_DIR / f"{source.stem}.{key}{MATRIX_SUFFIX}"
    if not cached.is_file():
        from ml_engine.llm.imatrix_llama import collect_importance_llama

        log.info("computing an importance matrix for %s on %s", source.name, path)
        matrix = collect_importance_llama(
            source, text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads, dataset=str(path)
        )
        write_imatrix(cached, matrix)
    return cached


def find_matrix(
    setting: str,
    source: Path | None,
    quantize_node: Mapping[str, Any],
    models_dir: Path,
    n_threads: int | None,
) -> tuple[Path | None, str]:
    """The matrix file ``setting`` asks for, and how it was found (or why there is none)."""
    if setting == NONE:
        return None, "quantize.imatrix=none"
    if setting != AUTO:
        return Path(setting), "quantize.imatrix"
    if source is None:
        return None, "no f32/f16/bf16 file to quantize with a matrix"
    beside = matrix_beside(source)
    if beside.is_file():
        return beside, "beside the model file"
    computed = calibration_matrix(source, quantize_node, models_dir, n_threads)
    if computed is not None:
        return computed, "computed on quantize.calibration_text"
    return None, (
        f"no matrix: none beside {source.name} ({beside.name}) and no quantize.calibration_text"
    )


def kld_figures(
    files: Mapping[str, Path],
    base_file: Path,
    settings: QualitySettings,
    models_dir: Path,
    open_file: Callable[[Path], LlamaCppBackend],
) -> dict[str, dict[str, Any]]:
    """Each candidate's comparison with ``base_file`` on the quality text (llama-perplexity's
    statistics), by label."""
    figures = {}
    for label, path in files.items():
        with open_file(path) as backend:
            stats = evaluate_quality(
                backend,
                base_file=base_file,
                base_quantization=None,
                models_dir=models_dir,
                settings=settings,
                open_base=open_file,
            )
        figures[label] = {
            "file": str(path),
            "file_mb": round(Path(path).stat().st_size / 1e6, 3),
            **{key: stats.get(key) for key in KEPT_FIGURES},
        }
    return figures


def lower_kld(figures: Mapping[str, Mapping[str, Any]]) -> str:
    """The label with the lower mean KLD (the plain file on a tie: it needs no matrix)."""
    order = sorted(figures, key=lambda label: (figures[label]["kl_mean"], label != "plain"))
    return order[0]


def prepare_file(
    llm: Mapping[str, Any],
    quantize_node: Mapping[str, Any] | None,
    quality_node: Mapping[str, Any],
    models_dir: Path,
    *,
    n_threads: int | None,
    open_file: Callable[[Path], LlamaCppBackend],
) -> tuple[ModelFile, dict[str, Any]]:
    """The file a generation job runs, made as ``quantize`` says, and the record of how.

    ``record``: ``setting`` (auto/none/file), ``matrix`` (its path, or null), ``found`` (how,
    or why not), ``used`` (the kept file was made with the matrix), ``tensor_types``, and with
    ``auto`` and a matrix, ``plain``/``imatrix``: each candidate's file, size and KLD figures.
    """
    quantize_node = quantize_node or {}
    model_cfg, quantization = llm["model"], llm.get("quantization")
    types = tensor_types_of(quantize_node.get("tensor_types"))
    setting = check_setting(quantize_node.get("imatrix", NONE))
    common = {
        "allow_download": bool(llm.get("allow_download", False)),
        "allow_requantize": bool(llm.get("allow_requantize", False)),
        "n_threads": n_threads,
    }
    record: dict[str, Any] = {
        "setting": setting,
        "tensor_types": dict(types) or None,
        "tensor_types_text": " ".join(f"{p}={t}" for p, t in types) or None,
    }
    plain_variant = Variant(tensor_types=types)
    if quantization is None or is_float(str(quantization)):
        resolved = ensure_model_file(model_cfg, quantization, models_dir, **common)
        return resolved, {**record, "matrix": None, "found": "a float file", "used": False}
    quantization = str(quantization)
    source = float_source(model_cfg, quantization, models_dir)
    matrix_path, found = find_matrix(setting, source, quantize_node, models_dir, n_threads)
    record.update(matrix=str(matrix_path) if matrix_path else None, found=found, used=False)
    if matrix_path is None:
        return ensure_model_file(
            model_cfg, quantization, models_dir, variant=plain_variant, **common
        ), record
    if source is None:
        raise UserError(
            f"quantize.imatrix={matrix_path}: {quantization} is made from an already-quantized "
            "file here; a matrix applies to quantizing an f32/f16/bf16 file"
        )
    matrix, digest = load_matrix(matrix_path, source)
    weighted_variant = Variant(matrix, str(matrix_path), digest, types)
    weighted = ensure_model_file(
        model_cfg, quantization, models_dir, variant=weighted_variant, **common
    )
    if setting != AUTO:
        return weighted, {**record, "used": True}
    plain = ensure_model_file(model_cfg, quantization, models_dir, variant=plain_variant, **common)
    settings = QualitySettings.from_spec({"quality": quality_node})
    base = base_quantization(model_cfg, models_dir)
    if not settings.enabled or base is None:
        record["found"] += "; not gated (quality.enabled=false or no base file): plain kept"
        return plain, record
    base_file = model_path(model_cfg, base, models_dir)
    figures = kld_figures(
        {"plain": plain.path, "imatrix": weighted.path}, base_file, settings, models_dir, open_file
    )
    kept = lower_kld(figures)
    record.update(figures, kept=kept, used=kept == "imatrix")
    log.info(
        "%s %s: mean KLD %.6g without the matrix, %.6g with it: kept %s",
        model_cfg.get("name"),
        quantization,
        figures["plain"]["kl_mean"],
        figures["imatrix"]["kl_mean"],
        "the weighted file" if kept == "imatrix" else "the plain file",
    )
    return (weighted if kept == "imatrix" else plain), record


def gate_files(
    candidates: Mapping[str, Path],
    base_file: Path,
    text_path: Path,
    *,
    n_ctx: int,
    n_chunks: int | None,
    n_threads: int | None = None,
    work_dir: Path,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """For a caller holding its own files (export.py): each candidate's KLD figures against
    ``base_file`` on ``text_path`` (chunks of ``n_ctx`` tokens, llama-perplexity's way) and
    the label of the lower one."""
    settings = QualitySettings(text_path=str(text_path), n_ctx=n_ctx, n_chunks=n_chunks)

    def open_file(path: Path) -> LlamaCppBackend:
        return LlamaCppBackend(path, n_ctx=n_ctx, n_threads=n_threads, n_batch=max(n_ctx, 32))

    figures = kld_figures(candidates, base_file, settings, work_dir, open_file)
    return lower_kld(figures), figures
