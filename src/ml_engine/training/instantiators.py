"""Build lists of callbacks and loggers from named config nodes."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _instantiate_named(group: DictConfig | None, kind: str) -> list:
    if not group:
        return []
    objects = []
    for name, node in group.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("Instantiating %s <%s> (%s)", kind, node._target_, name)
            objects.append(instantiate(node))
    return objects


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_named(callbacks_cfg, "callback")


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_named(logger_cfg, "logger")
