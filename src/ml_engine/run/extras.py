"""Chores every entrypoint may ask for in its ``extras`` node: warning filters, what the run is.

A run prints one line saying what was chosen (:func:`run_summary`); the whole config is saved in
the run dir (``.hydra/config.yaml``, ``config_resolved.yaml``) and printed as a tree only with
``extras.print_config=true``: 85-135 lines before every run and every sweep job buried the
lines that matter.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml_engine.run.distributed import is_rank_zero

# Lightning's advice about worker processes: num_workers=0 is our deliberate default
# (in-memory batches are faster than worker IPC, and fork is fragile on macOS).
_NOISY_WARNINGS = (
    r".*does not have many workers.*",
    r".*The number of training batches.*",
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning vs torch 2.14 internals
)

# Info lines that say nothing a user can act on and come again with every sweep job: Lightning's
# advertising, devices absent (the summary line names the one used), our defaults echoed back,
# and our own "Instantiating ..." per callback (the summary names the loggers). Lines that call
# for action (a GPU present but unused, Tensor Cores) are not among them.
_CONSOLE_NOISE = re.compile(
    r"^\W*Tip: "
    r"|^[GTHI]PU available: False"
    r"|^Trainer already configured with model summary callbacks"
    r"|^Loading `train_dataloader` to estimate number of stepping batches"
    r"|^`Trainer\(limit_(train|val|test|predict)_batches=1\.0\)` was configured so 100%"
    r"|^Instantiating (callback|logger) <"
)
_NOISY_LOGGERS = ("lightning", "ml_engine.training.instantiators")


class ConsoleNoise(logging.Filter):
    """Drops :data:`_CONSOLE_NOISE` lines of Lightning's and the instantiators' loggers
    (conf/hydra/default.yaml puts it on the console handler; each job's log file keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_NOISY_LOGGERS):
            return True
        return not _CONSOLE_NOISE.search(record.getMessage())


def apply_extras(cfg: DictConfig) -> None:
    """Called where the task's work starts, after its own checks: quiet known-harmless
    warnings, then (rank zero) the one-line summary and, when asked for, the config tree."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    else:
        for pattern in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    if not is_rank_zero():
        return
    print(run_summary(cfg), flush=True)
    if extras.get("print_config"):
        print_config_tree(cfg)


def print_config_tree(cfg: DictConfig) -> None:
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    for key, node in cfg.items():
        if key == "hydra":
            continue
        text = OmegaConf.to_yaml(node, resolve=False) if isinstance(node, DictConfig) else str(node)
        tree.add(str(key)).add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def run_summary(cfg: DictConfig) -> str:
    """``<task>: key=value ...``: what the run was given (model, data, device, logger), then its
    run dir. Fields come from the config's own nodes, so every task gets its natural ones."""
    fields = {"experiment": _choice("experiment")}
    if "llm" in cfg:
        fields |= _generation_fields(cfg)
    else:
        fields |= _model_fields(cfg)
    if "trainer" in cfg:
        fields |= _trainer_fields(cfg.trainer)
    if "logger" in cfg:
        fields["logger"] = ",".join(cfg.logger or {}) or "none"
    fields["run_dir"] = _shown_path(_select(cfg, "paths.output_dir"))
    shown = " ".join(f"{key}={value}" for key, value in fields.items() if value not in (None, ""))
    return f"{cfg.get('task_name', 'run')}: {shown}"


def _select(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``; None when it is absent, null, or cannot be resolved yet."""
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # an interpolation the task fills in later
        return None


def _choice(group: str) -> str | None:
    """The option chosen for config group ``group`` in this run, if Hydra knows it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def _shown_path(value: Any) -> str | None:
    """A path relative to the current dir when it lies below it (as a user typed it)."""
    if value is None:
        return None
    path = Path(str(value))
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _model_fields(cfg: DictConfig) -> dict[str, Any]:
    """Training tasks: the network, the data (with where it comes from), the checkpoint and the
    files predict/export read and write."""
    network = _select(cfg, "model.net.name") or _choice("model")
    fields: dict[str, Any] = {"model": network if "model" in cfg else None}
    if "datamodule" in cfg:
        fields["data"] = _data_description(cfg)
    fields["ckpt"] = _shown_path(_select(cfg, "ckpt_path"))
    for key in ("input", "quantization", "output", "device"):
        value = _select(cfg, key)
        fields[key] = _shown_path(value) if key in ("input", "output") else value
    return fields


def _data_description(cfg: DictConfig) -> str:
    """``mnist(bundled)``, ``text(<path>)``, ``torchvision(CIFAR10)``, ``image_folder(<dir>)``."""
    name = _choice("datamodule") or "data"
    detail = next(
        (
            _select(cfg, f"datamodule.{key}")
            for key in ("name", "root", "path", "source")
            if _select(cfg, f"datamodule.{key}") is not None
        ),
        "bundled" if name == "text" else None,
    )
    return f"{name}({_shown_path(detail) if name != 'mnist' else detail})" if detail else name


def _trainer_fields(trainer: DictConfig) -> dict[str, Any]:
    accelerator = str(_select(trainer, "accelerator") or "auto")
    device = _device_of(accelerator)
    devices = _select(trainer, "devices")
    nodes = _select(trainer, "num_nodes") or 1
    count = f"x{devices}" if devices not in (None, 1, "1") else ""
    count += f"x{nodes}nodes" if nodes != 1 else ""
    shown = device + count + ("(auto)" if accelerator == "auto" else "")
    return {"device": shown, "precision": _select(trainer, "precision")}


def _device_of(accelerator: str) -> str:
    """``auto`` as Lightning resolves it (CUDA, else MPS, else CPU); other names as given."""
    if accelerator != "auto":
        return accelerator
    torch = sys.modules.get("torch")  # loaded by every Lightning task before this runs
    if torch is None:
        return "auto"
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _generation_fields(cfg: DictConfig) -> dict[str, Any]:
    """generate: the model (with llm.model.path, its file), quantization, backend, GPU layers,
    threads, prompt set."""
    path = _select(cfg, "llm.model.path")
    name = _select(cfg, "llm.model.name")
    packaged = bool(_select(cfg, "llm.model.packaged"))  # its file inside the package
    model = _shown_path(path) if path and not packaged else name
    return {
        "model": model,
        "quantization": _select(cfg, "llm.quantization"),
        "backend": _select(cfg, "llm.backend.name"),
        "n_gpu_layers": _select(cfg, "llm.n_gpu_layers"),
        "threads": _select(cfg, "llm.n_threads") or "auto",
        "prompts": "given" if _select(cfg, "prompt") else _choice("prompts"),
    }
