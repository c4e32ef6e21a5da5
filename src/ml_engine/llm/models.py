"""Where a configured model's GGUF file for a quantization lives, and how it gets there.

A model config (``conf/llm/model/<name>.yaml``) names its file per quantization under
``paths.models_dir``. Resolution order: the file on disk → (embedded tiny) written on first use →
produced from a higher-precision file on disk → downloaded, only when the user allows it →
otherwise one line naming the path looked at and how to obtain the file.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.quantize import (
    QUANTIZATIONS,
    SOURCE_PRECISIONS,
    check_quantization,
    precision_rank,
    quantize_gguf,
)
from ml_engine.run.locations import install_command

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


@dataclass(frozen=True)
class ModelFile:
    """A resolved model file and its origin: on_disk, written, quantized_from_*, downloaded."""

    path: Path
    quantization: str
    origin: str


def model_names() -> list[str]:
    """The configured models: the names of ``conf/llm/model/*.yaml``."""
    from ml_engine.run.locations import CONFIG_DIR

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
    return Path(models_dir) / _file_name(model_cfg, check_quantization(quantization))


def available_quantizations(model_cfg: Mapping[str, Any], models_dir: Path) -> list[str]:
    """The quantizations of this model present on disk, most precise first."""
    return [q for q in QUANTIZATIONS if model_path(model_cfg, q, models_dir).is_file()]


def base_quantization(model_cfg: Mapping[str, Any], models_dir: Path) -> str | None:
    """The most precise quantization on disk: the reference for agreement and KL divergence."""
    present = available_quantizations(model_cfg, models_dir)
    return present[0] if present else None


def ensure_model_file(
    model_cfg: Mapping[str, Any],
    quantization: str,
    models_dir: Path,
    *,
    allow_download: bool = False,
    n_threads: int | None = None,
) -> ModelFile:
    """The model's file at ``quantization``, producing it when it can (see module docstring)."""
    models_dir = Path(models_dir)
    target = model_path(model_cfg, quantization, models_dir)
    if target.is_file():
        return ModelFile(target, quantization, "on_disk")
    if model_cfg.get("source") == EMBEDDED:
        base = _write_embedded(model_cfg, models_dir)
        if base.quantization == quantization:
            return base
    source = _higher_precision_source(model_cfg, quantization, models_dir)
    if source is not None:
        log.info("producing %s from %s", target.name, source.name)
        quantize_gguf(source, target, quantization, n_threads)
        return ModelFile(target, quantization, f"quantized_from_{_quant_of(model_cfg, source)}")
    if allow_download and model_cfg.get("repo_id"):
        return ModelFile(_download(model_cfg, quantization, models_dir), quantization, "downloaded")
    raise UserError(_missing_file_message(model_cfg, quantization, target, models_dir))


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
