"""Name → network-builder registry, open to other packages through an entry-point group.

A third-party package adds networks without touching this repo by declaring, in its own
pyproject::

    [project.entry-points."ml_engine.networks"]
    my_net = "my_pkg.nets:build_my_net"

Each installed plugin network also becomes an option of the ``model/net`` config group
(``python train.py model/net=my_net``) holding only its own arguments, so selecting it never
inherits another network's ``widths`` or ``dropout``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from ml_engine.errors import UnknownNameError, UserError

if TYPE_CHECKING:  # torch loads only when a network is built, not when configs compose
    from torch import nn

ENTRY_POINT_GROUP = "ml_engine.networks"
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


def _plugin_entry_points() -> list[EntryPoint]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _load_builtin_and_plugins() -> None:
    # the built-in networks register themselves on import
    import ml_engine.training.lm.llama
    import ml_engine.training.vision.networks
    import ml_engine.training.vision.torchvision_nets  # noqa: F401

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
