"""Networks by name: built-ins, plugins through the entry-point group, clear unknown-name errors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ml_engine import registry
from ml_engine.errors import UnknownNameError


def test_builtin_networks_are_registered_and_classify_digits() -> None:
    assert {"cnn_mnist", "mlp_mnist"} <= set(registry.network_names())
    for name in ("cnn_mnist", "mlp_mnist"):
        net = registry.build_network(name, num_classes=10)
        assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_mnist_stays_small() -> None:
    net = registry.build_network("cnn_mnist")
    assert 30_000 < sum(p.numel() for p in net.parameters()) < 40_000


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.build_network("resnet_9000")
    message = str(info.value)
    assert message.startswith("unknown network 'resnet_9000'; accepted: ")
    assert "cnn_mnist" in message and "mlp_mnist" in message
    assert "\n" not in message


def test_decorator_refuses_a_second_builder_under_the_same_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register_network("cnn_mnist")(lambda **_: torch.nn.Identity())


def test_installed_package_adds_a_network_through_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real distribution on sys.path (dist-info + entry_points.txt), as pip would install it."""
    (tmp_path / "extra_nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build_tiny_linear(num_classes=10):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))
            """
        )
    )
    dist_info = tmp_path / "extra_nets-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-nets\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\ntiny_linear = extra_nets:build_tiny_linear\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_NETWORKS", dict(registry._NETWORKS))
    try:
        assert "tiny_linear" in registry.network_names()
        net = registry.build_network("tiny_linear", num_classes=10)
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    finally:
        sys.modules.pop("extra_nets", None)
