"""Networks by name: built-ins, plugins through the entry-point group, clear unknown-name errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from ml_engine.errors import UnknownNameError
from ml_engine.run.locations import PROJECT_ROOT
from ml_engine.training import registry
from tests.conftest import CLI_TEST_OVERRIDES, compose_config, run_dir_of
from tests.venvs import make_child_venv


def test_builtin_networks_are_registered_and_classify_digits() -> None:
    assert {"cnn_mnist", "mlp_mnist"} <= set(registry.network_names())
    for name in ("cnn_mnist", "mlp_mnist"):
        net = registry.build_network(name, num_classes=10)
        assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_mnist_stays_small() -> None:
    # the constructor's defaults are the original net, so that older checkpoints rebuild
    net = registry.build_network("cnn_mnist")
    assert 30_000 < sum(p.numel() for p in net.parameters()) < 40_000
    configured = dict(compose_config("train", []).model.net)
    net = registry.build_network(configured.pop("name"), **configured)
    assert 95_000 < sum(p.numel() for p in net.parameters()) < 110_000
    # the pooled head takes any image size and channel count
    colour = registry.build_network("cnn_mnist", in_channels=3, pooled_size=3, num_classes=4)
    assert colour(torch.zeros(2, 3, 40, 52)).shape == (2, 4)


@pytest.mark.parametrize("override", ["model.net.pooled_size=0", "model.net.last_convs=1.5"])
def test_cnn_mnist_bad_head_argument_is_one_line(override: str) -> None:
    from ml_engine.errors import UserError

    configured = dict(compose_config("train", [override]).model.net)
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^{re.escape(key)}=.* expected an integer ≥ 1$"):
        registry.build_network(configured.pop("name"), **configured)


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


def _readme_block(language: str, containing: str) -> str:
    """The training page's (docs/training.md, once the README's) fenced ``language`` block that
    contains ``containing``."""
    page = (PROJECT_ROOT / "docs" / "training.md").read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", page, flags=re.S)
    return next(block for block in blocks if containing in block)


def _install_readme_plugin(tmp_path: Path) -> Path:
    """The README's plugin (its class and its entry point), pip-installed into a fresh venv that
    sees this environment's packages; returns that venv's python."""
    package = tmp_path / "my_pkg_src"
    (package / "my_pkg").mkdir(parents=True)
    (package / "my_pkg" / "__init__.py").write_text("")
    (package / "my_pkg" / "nets.py").write_text(_readme_block("python", "my_net"))
    entry_points = _readme_block("toml", registry.ENTRY_POINT_GROUP)
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "my-pkg"
            version = "0.1"

            [tool.setuptools]
            packages = ["my_pkg"]

            """
        )
        + entry_points
    )
    # no pip of its own: this environment's pip and setuptools build and install into it
    python = make_child_venv(tmp_path / "venv", with_project=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(package),
        ],
        check=True,
        capture_output=True,
    )
    return python


@pytest.mark.slow
def test_readme_plugin_example_trains_with_only_its_own_arguments(tmp_path: Path) -> None:
    python = _install_readme_plugin(tmp_path)
    command = _readme_block("bash", "model/net=my_net").strip().split()
    assert command[:2] == ["python", "train.py"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [
            str(python),
            str(PROJECT_ROOT / "train.py"),
            *command[2:],
            *CLI_TEST_OVERRIDES,
            "debug=fdr",
            f"paths.log_dir={tmp_path / 'outputs'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((run_dir_of(result) / "config_resolved.yaml").read_text())
    assert config["model"]["net"] == {"name": "my_net", "width": 128}

    # renaming the network alone would hand it cnn_mnist's widths: one line says what to do
    renamed = subprocess.run(
        [
            str(python),
            str(PROJECT_ROOT / "train.py"),
            "model.net.name=my_net",
            *CLI_TEST_OVERRIDES,
            "debug=fdr",
            f"paths.log_dir={tmp_path / 'outputs'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert renamed.returncode == 1
    lines = renamed.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "error: network 'my_net' takes no widths, last_convs, pooled_size, dropout"
    )
    assert "model/net=my_net" in lines[-1] and "Traceback" not in renamed.stderr


def test_network_options_carry_only_their_own_arguments() -> None:
    cnn = compose_config("train", ["model=cnn_mnist"]).model.net
    mlp_in_cnn = compose_config("train", ["model=cnn_mnist", "model/net=mlp_mnist"]).model
    assert set(cnn) == {"name", "widths", "last_convs", "pooled_size", "dropout"}
    assert dict(mlp_in_cnn.net) == {"name": "mlp_mnist", "hidden_sizes": [256, 128], "dropout": 0.2}
    assert mlp_in_cnn.optimizer.lr == 0.003  # the rest of model=cnn_mnist stays


def test_plugin_defaults_become_the_net_config() -> None:
    def build(width: int = 64, sizes: tuple = (1, 2), act: object = print, num_classes: int = 10):
        return torch.nn.Identity()

    assert registry.default_arguments(build) == {"width": 64, "sizes": [1, 2]}
