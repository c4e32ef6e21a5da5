"""Name → network-builder and kind → LightningModule registries, open to other packages
through entry-point groups. The harness finds the wings (``training/vision``, ``training/lm``)
here, never by importing them.

A third-party package adds networks without touching this repo by declaring, in its own
pyproject::

    [project.entry-points."ml_engine.networks"]
    my_net = "my_pkg.nets:build_my_net"

Each installed plugin network also becomes an option of the ``model/net`` config group
(``python train.py model/net=my_net``) holding only its own arguments, so selecting it never
inherits another network's ``widths`` or ``dropout``.

LightningModules are found by the kind a checkpoint records (their class name), through the
``ml_engine.modules`` group; this package declares its own two there::

    [project.entry-points."ml_engine.modules"]
    ClassifierModule = "ml_engine.training.vision.module:ClassifierModule"

Loading a module class imports its wing, which registers the wing's built-in networks.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from ml_engine.errors import UnknownNameError, UserError

if TYPE_CHECKING:  # torch loads only when a network is built, not when configs compose
    from torch import nn

ENTRY_POINT_GROUP = "ml_engine.networks"
MODULE_ENTRY_POINT_GROUP = "ml_engine.modules"
# the checkpoint key naming the LightningModule class that wrote it (eval rebuilds that one)
MODULE_CLASS_KEY = "ml_engine_module"
NET_CONFIG_GROUP = "model/net"
# set by the LightningModule itself (ClassifierModule, CausalLMModule), never part of a
# network's config
_MODULE_SUPPLIED_ARGS = ("num_classes", "in_channels", "image_size", "vocab_size")

# what a network does, i.e. which LightningModule trains it: digit classifiers (images → class
# logits, the kind of every plugin network) or causal language models (ids → next-id logits)
CLASSIFIER, CAUSAL_LM = "classifier", "causal_lm"

NetworkBuilder = Callable[..., "nn.Module"]

_NETWORKS: dict[str, NetworkBuilder] = {}
_KINDS: dict[str, str] = {}
_MODULES: dict[str, type] = {}

# modules that left their place (issue 25): checkpoints and run configs written before the move
# name them by the old dotted path
MOVED_MODULES: dict[str, str] = {
    **{
        f"ml_engine.training.{old}": f"ml_engine.training.vision.{new}"
        for old, new in (
            ("module", "module"),
            ("networks", "networks"),
            ("torchvision_nets", "torchvision_nets"),
            ("datamodules", "mnist"),
            ("data_sources", "data_sources"),
            ("image_data", "image_data"),
            ("image_datamodules", "image_datamodules"),
            ("images", "images"),
            ("augment", "augment"),
            ("predict", "predict"),
        )
    },
    **{
        f"ml_engine.training.{old}": f"ml_engine.training.lm.{new}"
        for old, new in (
            ("llama", "llama"),
            ("lm_module", "module"),
            ("text_data", "text_data"),
            ("char_tokenizer", "tokenizer"),
            ("export", "export"),
        )
    },
}


def current_path(dotted: str) -> str:
    """``dotted`` (a module, or an object in one) under today's module path."""
    module, dot, rest = dotted, "", ""
    while module:
        if module in MOVED_MODULES:
            return MOVED_MODULES[module] + dot + rest
        module, dot, tail = module.rpartition(".")
        rest = f"{tail}.{rest}" if rest else tail
    return dotted


def current_paths(value: Any) -> Any:
    """``value`` (hyperparameters, a config) with every old dotted path under today's."""
    if isinstance(value, str):
        return current_path(value) if value.startswith("ml_engine.training.") else value
    if isinstance(value, dict):
        return {key: current_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(current_paths(item) for item in value)
    return value


def register_network(
    name: str, kind: str = CLASSIFIER
) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Class or function decorator that makes a network buildable by ``name``."""

    def decorator(builder: NetworkBuilder) -> NetworkBuilder:
        existing = _NETWORKS.get(name)
        if existing is not None and existing is not builder:
            raise ValueError(f"network '{name}' is already registered by {existing!r}")
        _NETWORKS[name] = builder
        _KINDS[name] = kind
        return builder

    return decorator


def register_module(cls: type) -> type:
    """Class decorator: checkpoints whose recorded kind is ``cls.__name__`` load as ``cls``."""
    existing = _MODULES.get(cls.__name__)
    if existing is not None and existing is not cls:
        raise ValueError(f"module kind '{cls.__name__}' is already registered by {existing!r}")
    _MODULES[cls.__name__] = cls
    return cls


def _import_wings() -> list[str]:
    """Import ``training/<wing>/module.py`` of every wing of this package (its module classes
    register themselves): the way to them where no metadata names them (``PYTHONPATH=src``, or
    an editable install from before the entry-point group)."""
    imported = []
    for info in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        name = f"{__package__}.{info.name}.module"
        if info.ispkg and importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            imported.append(name)
    return imported


def module_classes() -> dict[str, type]:
    """Every LightningModule class a checkpoint may name, by kind (class name): the installed
    ``ml_engine.modules`` entry points and those registered in this process."""
    entries = list(entry_points(group=MODULE_ENTRY_POINT_GROUP))
    if not any(entry.value.startswith(f"{__package__}.") for entry in entries):
        _import_wings()
    for entry in entries:
        if entry.name not in _MODULES:
            _MODULES[entry.name] = entry.load()
    return dict(_MODULES)


def _plugin_entry_points() -> list[EntryPoint]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _load_builtin_and_plugins() -> None:
    # the wings' modules import their built-in networks, which register themselves
    module_classes()
    for entry in _plugin_entry_points():
        if entry.name not in _NETWORKS:
            _NETWORKS[entry.name] = entry.load()


def network_names(kind: str | None = None) -> list[str]:
    """Registered network names (built-ins and installed plugins'), of one ``kind`` if given."""
    _load_builtin_and_plugins()
    return sorted(n for n in _NETWORKS if kind is None or _KINDS.get(n, CLASSIFIER) == kind)


def _accepted_arguments(builder: NetworkBuilder) -> list[str] | None:
    """Keyword arguments ``builder`` takes; None when it takes any (``**kwargs``)."""
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def build_network(
    name: str, supplied: dict[str, object] | None = None, **kwargs: object
) -> nn.Module:
    """Build the network registered as ``name`` with its keyword arguments.

    ``supplied``: what the module knows of the data (``num_classes``, ``in_channels``,
    ``image_size``); each is passed only to builders that take it, so a plugin network written
    for MNIST needs no ``in_channels`` argument.
    """
    _load_builtin_and_plugins()
    if name not in _NETWORKS:
        raise UnknownNameError("network", name, list(_NETWORKS))
    builder = _NETWORKS[name]
    accepted = _accepted_arguments(builder)
    for key, value in (supplied or {}).items():
        # num_classes always, as before; the rest only where named (not through **kwargs)
        if key == "num_classes" or (accepted is not None and key in accepted):
            kwargs.setdefault(key, value)
    unexpected = [key for key in kwargs if accepted is not None and key not in accepted]
    if unexpected:
        own = [a for a in accepted or [] if a not in _MODULE_SUPPLIED_ARGS]
        raise UserError(
            f"network '{name}' takes no {', '.join(unexpected)} (its arguments: "
            f"{', '.join(own) or 'none'}); select it with model/net={name}, which brings only "
            "its own arguments"
        )
    return builder(**kwargs)


def _config_value(value: Any) -> Any:
    """A default that can sit in a YAML node, or ``...`` when it cannot."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_config_value(item) for item in value]
        return ... if any(item is ... for item in items) else items
    return ...


def default_arguments(builder: NetworkBuilder) -> dict[str, Any]:
    """The builder's keyword defaults that a config can hold (``num_classes`` excluded)."""
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return {}
    defaults = {}
    for parameter in parameters:
        if parameter.name in _MODULE_SUPPLIED_ARGS or parameter.default is inspect.Parameter.empty:
            continue
        value = _config_value(parameter.default)
        if value is not ...:
            defaults[parameter.name] = value
    return defaults


def plugin_net_configs() -> dict[str, dict[str, Any]]:
    """``model/net`` options for installed plugin networks: name plus the builder's defaults.

    A plugin that fails to import still gets a name-only option, so that selecting it reports
    the plugin's own import error instead of "unknown option".
    """
    configs: dict[str, dict[str, Any]] = {}
    for entry in _plugin_entry_points():
        try:
            arguments = default_arguments(entry.load())
        except Exception:  # reported when the network is built
            arguments = {}
        configs[entry.name] = {"name": entry.name, **arguments}
    return configs


def register_network_configs() -> None:
    """Offer every installed plugin network as a ``model/net`` option in Hydra's ConfigStore.

    A plugin's defaults live in its builder's signature; no YAML file is involved.
    """
    configs = plugin_net_configs()
    if not configs:
        return
    from hydra.core.config_store import ConfigStore

    config_store = ConfigStore.instance()
    for name, node in configs.items():
        config_store.store(group=NET_CONFIG_GROUP, name=name, node=node, provider="ml_engine")
