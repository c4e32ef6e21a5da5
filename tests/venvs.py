"""Fresh venvs for install tests: they see this environment's packages (torch & co.)."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import ml_engine


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
