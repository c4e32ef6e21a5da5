"""The checks of a run's settings that need no Lightning, made before it loads: a refused run
ends in about a second, not after seconds of imports (torch loads only to probe for CUDA)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from ml_engine.errors import UserError
from ml_engine.run.locations import install_command
from ml_engine.training.accelerators import (
    check_accelerator,
    check_num_nodes,
    check_sync_batchnorm,
)

# loggers whose package is an optional extra of ours: class name → (import name, extra)
_OPTIONAL_LOGGER_PACKAGES = {
    "MLFlowLogger": ("mlflow", "loggers"),
    "WandbLogger": ("wandb", "loggers"),
}


def check_run_settings(cfg: DictConfig) -> None:
    """Accelerator, SyncBatchNorm, nodes and logger packages: each refused in one line."""
    check_accelerator(cfg.trainer.get("accelerator"))
    check_sync_batchnorm(cfg.trainer)
    check_num_nodes(cfg.trainer)
    check_logger_packages(cfg.get("logger"))


def check_logger_packages(logger_cfg: Mapping[str, Any] | None) -> None:
    """Before any work: a selected logger whose package is missing is one line naming the extra."""
    for name, node in (logger_cfg or {}).items():
        target = str((node or {}).get("_target_", "")) if isinstance(node, Mapping) else ""
        package, extra = _OPTIONAL_LOGGER_PACKAGES.get(target.rsplit(".", 1)[-1], (None, None))
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"logger '{name}' needs the {package} package, which is not installed; "
                f"install it with: {install_command(extra)}"
            )
