"""Copies the repo's conf/ into the built package as ml_engine/conf.

conf/ stays at the top of the repository as the one source of the configs; a wheel (and so a
non-editable ``pip install .``) must carry them, since an installed package has no repo around it.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

REPO_CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the repo's conf/ directly
            return
        target = Path(self.build_lib) / "ml_engine" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(REPO_CONF, target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
