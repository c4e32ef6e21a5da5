"""Name → network-builder registry, open to other packages through an entry-point group.

A third-party package adds networks without touching this repo by declaring, in its own
pyproject::

    [project.entry-points."ml_engine.networks"]
    my_net = "my_pkg.nets:build_my_net"
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from torch import nn

from ml_engine.errors import UnknownNameError

ENTRY_POINT_GROUP = "ml_engine.networks"

NetworkBuilder = Callable[..., nn.Module]

_NETWORKS: dict[str, NetworkBuilder] = {}


def register_network(name: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Class or function decorator that makes a network buildable by ``name``."""

    def decorator(builder: NetworkBuilder) -> NetworkBuilder:
        existing = _NETWORKS.get(name)
        if existing is not None and existing is not builder:
            raise ValueError(f"network '{name}' is already registered by {existing!r}")
        _NETWORKS[name] = builder
        return builder

    return decorator


def _load_builtin_and_plugins() -> None:
    import ml_engine.networks  # noqa: F401  (registers the built-in networks on import)

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _NETWORKS:
            _NETWORKS[entry.name] = entry.load()


def network_names() -> list[str]:
    """Every registered network name: built-ins and those of installed plugins."""
    _load_builtin_and_plugins()
    return sorted(_NETWORKS)


def build_network(name: str, **kwargs: object) -> nn.Module:
    """Build the network registered as ``name`` with its keyword arguments."""
    _load_builtin_and_plugins()
    if name not in _NETWORKS:
        raise UnknownNameError("network", name, list(_NETWORKS))
    return _NETWORKS[name](**kwargs)
