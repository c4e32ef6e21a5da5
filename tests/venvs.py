"""Fresh venvs for install tests: they see this environment's packages (torch & co.)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import ml_engine
from ml_engine.run.locations import PROJECT_ROOT

BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "conf", "src")
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q")


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` on a copy of the sources, so the checkout gets no build/ or egg-info.

    The tests share one per session: the ``project_wheel`` fixture (conftest.py)."""
    sources = tmp_path / "sources"
    sources.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in BUILD_INPUTS:
        origin = PROJECT_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, sources / name, ignore=ignore)
        else:
            shutil.copy2(origin, sources / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [*PIP_WHEEL, str(sources), "-w", str(dist)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("ml_engine-*.whl")
    return wheel


def clean_env() -> dict[str, str]:
    """No trace of the checkout: no PYTHONPATH, no PROJECT_ROOT pointing into the repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HYDRA_"))}
    for key in ("PROJECT_ROOT", "ML_ENGINE_TRACEBACK", "VIRTUAL_ENV"):
        env.pop(key, None)
    return {**env, "PYTHONUNBUFFERED": "1"}


def make_child_venv(venv: Path, with_project: bool) -> Path:
    """A venv at ``venv`` (no pip of its own) that sees this environment's site-packages.

    ``--system-site-packages`` reaches only the base interpreter's packages when the tests run in
    a venv themselves, so this environment's site-packages are added behind the new venv's own
    by a .pth file. An editable install of ml_engine is a .pth file in turn, which Python does
    not follow from a path that a .pth added: ``with_project`` adds the source dir of the
    ml_engine under test explicitly; without it the venv sees no ml_engine until one is installed.
    Returns the venv's python.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    python = venv / "bin" / "python"
    venv_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    if with_project:
        paths.insert(0, str(Path(ml_engine.__file__).resolve().parents[1]))
    (Path(venv_site) / "outer_environment.pth").write_text("\n".join(paths) + "\n")
    return python
