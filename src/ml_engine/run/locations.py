"""Where the configs live and where outputs go, for a checkout and for an installed package."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
_CHECKOUT_ROOT = PACKAGE_DIR.parents[1]


def _is_checkout(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "conf" / "train.yaml").is_file()


# From a checkout (editable install or PYTHONPATH=src) the repo's conf/ is the source of truth;
# an installed wheel carries a copy of it as ml_engine/conf, made at build time (setup.py).
RUNNING_FROM_CHECKOUT = _is_checkout(_CHECKOUT_ROOT)
CONFIG_DIR = _CHECKOUT_ROOT / "conf" if RUNNING_FROM_CHECKOUT else PACKAGE_DIR / "conf"
# Where outputs/, data/ and models/ go unless PROJECT_ROOT is set: the repo root of a checkout,
# the current directory for an installed package.
PROJECT_ROOT = _CHECKOUT_ROOT if RUNNING_FROM_CHECKOUT else Path.cwd()


def install_command(extra: str) -> str:
    """The pip command that adds an optional extra, for this kind of install."""
    if RUNNING_FROM_CHECKOUT:
        return f'pip install -e ".[{extra}]"'
    return f'pip install "ml-engine[{extra}]"'
