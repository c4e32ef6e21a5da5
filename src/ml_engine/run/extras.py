"""Chores every entrypoint may ask for in its ``extras`` node: warning filters, config printing."""

from __future__ import annotations

import warnings

from omegaconf import DictConfig, OmegaConf

# Lightning's advice about worker processes: num_workers=0 is our deliberate default
# (in-memory batches are faster than worker IPC, and fork is fragile on macOS).
_NOISY_WARNINGS = (
    r".*does not have many workers.*",
    r".*The number of training batches.*",
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning vs torch 2.14 internals
)


def apply_extras(cfg: DictConfig) -> None:
    """Optional chores from the ``extras`` node: quiet known-harmless warnings, print config."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    else:
        for pattern in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
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
