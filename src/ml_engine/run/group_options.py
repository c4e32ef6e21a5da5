"""Every ``group=option`` a user names must exist, checked before Hydra creates a run dir.

Hydra skips an ``optional`` default whose option is missing, so ``experiment=nope`` would run
the default setup without a word. The check covers every group in the config search path
(ours, Hydra's own such as ``hydra/launcher``, and installed plugins'), nested ones included.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ml_engine.errors import UserError
from ml_engine.run.locations import install_command


@dataclass(frozen=True)
class Extra:
    """An optional dependency group of the package and a module it provides."""

    name: str
    package: str
    module: str


SLURM = Extra("slurm", "hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher")

# group options that only work once an extra is installed
OPTIONS_NEEDING_EXTRAS: dict[tuple[str, str], Extra] = {
    ("hydra/launcher", "slurm"): SLURM,
    ("hydra/launcher", "submitit_slurm"): SLURM,
    ("hydra/launcher", "submitit_local"): SLURM,
}


def is_importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def missing_extra_message(group: str, option: str) -> str | None:
    """One line naming the pip command when ``group=option`` needs an extra not installed."""
    extra = OPTIONS_NEEDING_EXTRAS.get((group, option))
    if extra is None or is_importable(extra.module):
        return None
    return (
        f"{group}={option} needs {extra.package}, which is not installed: "
        f"{install_command(extra.name)}"
    )


def _search_path(config_dir: Path, extra_dirs: Iterable[str]):
    from hydra._internal.utils import create_config_search_path

    search_path = create_config_search_path(f"file://{config_dir}")
    for entry in extra_dirs:
        scheme = "" if "://" in entry else "file://"
        search_path.append("command-line", f"{scheme}{entry}")
    return search_path


def _chosen_options(override) -> list[str]:
    """The option names an override selects; none for deletions, null and non-choice sweeps."""
    from hydra.core.override_parser.types import ValueType

    if override.is_delete():
        return []
    if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
        return [str(v) for v in override.sweep_string_iterator() if str(v) != "null"]
    if override.value_type != ValueType.ELEMENT or override.value() is None:
        return []  # glob(...), range(...), interval(...): Hydra expands and checks these
    return [override.get_value_element_as_str()]


def _extra_search_dirs(args, overrides) -> list[str]:
    dirs = [args.config_dir] if getattr(args, "config_dir", None) else []
    for override in overrides:
        if override.key_or_group == "hydra.searchpath" and isinstance(override.value(), list):
            dirs.extend(str(entry) for entry in override.value())
    return dirs


def check_group_options(argv: Sequence[str], config_dir: Path) -> None:
    """Raise a UserError for the first ``group=option`` in ``argv`` that names no config."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import get_args_parser
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(list(argv))
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException:
        return  # malformed: Hydra reports it in its own words
    repository = ConfigRepository(_search_path(config_dir, _extra_search_dirs(args, overrides)))
    for override in overrides:
        group = override.key_or_group
        if not repository.group_exists(group):
            continue  # a config key (model.optimizer.lr=...), not a group
        accepted = repository.get_group_options(group, results_filter=ObjectType.CONFIG)
        for option in _chosen_options(override):
            needs_extra = missing_extra_message(group, option)
            if needs_extra:
                raise UserError(needs_extra)
            if option not in accepted:
                raise UserError(
                    f"unknown {group} '{option}'; accepted: {', '.join(accepted) or '(none)'}"
                )
