"""The wheel's requirements live with SQLAlchemy 2 and Optuna 5 (issue 26.1): no 2021-era pins.

hydra-optuna-sweeper needed optuna<3, which held SQLAlchemy below 2 and alembic below 1.14. A user
who already has SQLAlchemy 2 and Optuna 5 installs the wheel, and pip must change neither.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from tests.venvs import clean_env, make_child_venv

# the child venv's own copies: the newest 2.0.x and 5.0.x (2.0.58 and 5.0.0 when written; this
# environment had 2.1.9 and 5.1.0), older than the newest releases, so a pip that swapped them for
# newer ones, or for this environment's copies behind them, shows as a changed version
CHILD_PINS = ("sqlalchemy>=2.0,<2.1", "optuna>=5.0,<5.1")
WATCHED = ("sqlalchemy", "optuna", "alembic")
# the distributions the old sweeper's pins held back, and the sweeper itself: a `pip check` line
# naming one of them is a conflict this test is about (see pip_check_lines)
CONCERNED = (*WATCHED, "ml-engine", "ml_engine", "hydra-optuna-sweeper", "hydra_optuna_sweeper")

# for each watched distribution: its version and whether the child's own site-packages holds it
VERSIONS = """
import importlib.metadata as md, json, sys, sysconfig
from pathlib import Path
own = Path(sysconfig.get_path("purelib")).resolve()
found = {}
for name in sys.argv[1:]:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    where = Path(dist.locate_file("")).resolve()
    found[name] = {"version": dist.version, "own": where == own}
print(json.dumps(found))
"""

# the installed plugin and Optuna on SQLAlchemy: a study in a SQLite file goes through alembic's
# schema setup and SQLAlchemy 2's ORM
SMOKE = """
import importlib.util, json, sys, sysconfig
from pathlib import Path
import hydra_plugins.ml_engine_optuna as plugin, ml_engine, optuna, sqlalchemy
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(storage="sqlite:///" + sys.argv[1], study_name="s")
study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
own = Path(sysconfig.get_path("purelib")).resolve()
old = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper")
print(json.dumps({
    "own": [Path(m.__file__).resolve().is_relative_to(own)
            for m in (plugin, ml_engine, optuna, sqlalchemy)],
    "versions": [optuna.__version__, sqlalchemy.__version__],
    "trials": len(study.trials),
    "old_sweeper": None if old is None else str(old.origin),
}))
"""


def pip(python: Path, *args: str, cwd: Path, timeout: float = 240) -> str:
    """This environment's pip acting on ``python``'s environment (pip --python, pip >= 22.3):
    the child venv has no pip of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


def in_child(python: Path, code: str, *args: str, cwd: Path) -> dict:
    done = subprocess.run(
        [str(python), "-c", code, *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def pip_check_lines(python: Path, cwd: Path) -> list[str]:
    """``pip check`` for the child: its own packages in front of this environment's."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "check"],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 0:
        return []
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr[-3000:]  # pip failed without naming a conflict
    return lines


@pytest.mark.slow
def test_wheel_keeps_sqlalchemy_2_and_optuna_5(tmp_path: Path, project_wheel: Path) -> None:
    metadata = next(n for n in zipfile.ZipFile(project_wheel).namelist() if n.endswith("METADATA"))
    requires = [
        line.removeprefix("Requires-Dist:").strip().lower()
        for line in zipfile.ZipFile(project_wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert not [r for r in requires if r.startswith("hydra-optuna-sweeper")], requires
    assert any(r.startswith("optuna") for r in requires), requires

    outer_before = json.loads(
        subprocess.run(
            [sys.executable, "-c", VERSIONS, *WATCHED], capture_output=True, text=True, check=True
        ).stdout
    )
    python = make_child_venv(tmp_path / "venv", with_project=False)
    # `pip check` of the fresh child, before any install: the child sees this environment's
    # packages and, being made --system-site-packages, also the base interpreter's behind them,
    # which this venv does not see. Those layers may disagree with each other (here: the base
    # interpreter's botocore wants python-dateutil<3, this venv has 4.0) about packages this test
    # is not about; the child may inherit such lines, never add one
    inherited_conflicts = set(pip_check_lines(python, tmp_path))
    assert not [
        line for line in inherited_conflicts if any(n in line.lower() for n in CONCERNED)
    ], inherited_conflicts
    pip(python, "install", "-q", *CHILD_PINS, cwd=tmp_path)
    before = in_child(python, VERSIONS, *WATCHED, cwd=tmp_path)
    assert before["sqlalchemy"]["own"] and before["optuna"]["own"], before
    assert before["sqlalchemy"]["version"].startswith("2.0."), before
    assert before["optuna"]["version"].startswith("5.0."), before
    # Optuna's own requirement brings alembic; the old pins held it below 1.14
    assert Version(before["alembic"]["version"]) >= Version("1.14"), before

    # dependencies resolved by pip, which sees the child's SQLAlchemy and Optuna (and through
    # them this environment's torch & co.): no --no-deps, no --ignore-installed
    pip(python, "install", "-q", str(project_wheel), cwd=tmp_path)
    if not in_child(python, VERSIONS, "ml-engine", cwd=tmp_path)["ml-engine"]["own"]:
        # this environment holds ml-engine 0.1.0 installed from a wheel (not editable): pip
        # resolved the wheel's requirements above but kept that copy; the files of the wheel
        # under test, alone
        pip(
            python,
            "install",
            "-q",
            "--no-deps",
            "--force-reinstall",
            str(project_wheel),
            cwd=tmp_path,
        )
    after = in_child(python, VERSIONS, *WATCHED, cwd=tmp_path)
    assert after == before, (before, after)

    # `pip check`: no conflict beyond the inherited ones, and none about the packages at stake
    child_conflicts = pip_check_lines(python, tmp_path)
    assert not [line for line in child_conflicts if line not in inherited_conflicts], (
        child_conflicts
    )
    concerned = [
        line for line in child_conflicts if any(name in line.lower() for name in CONCERNED)
    ]
    assert not concerned, concerned

    smoke = in_child(python, SMOKE, str(tmp_path / "study.db"), cwd=tmp_path)
    assert smoke["own"] == [True] * 4, smoke  # the wheel's plugin, the child's Optuna & SQLAlchemy
    assert smoke["versions"] == [before["optuna"]["version"], before["sqlalchemy"]["version"]]
    assert smoke["trials"] == 3
    # the old sweeper is gone from the child; this environment (which the child sees) has none
    # either, or the project's requirements would have been installed next to it
    assert smoke["old_sweeper"] is None, smoke
    assert not list((tmp_path / "venv").rglob("hydra_optuna_sweeper*")), "old sweeper in child"

    # the loggers extra: mlflow-skinny needs SQLAlchemy too; pip must not move it (nor Optuna,
    # alembic) to install the extra. A dry run says what pip would install.
    report = json.loads(
        pip(
            python,
            "install",
            "-q",
            "--dry-run",
            "--report",
            "-",
            f"{project_wheel}[loggers]",
            cwd=tmp_path,
        )
    )
    installs = {
        item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]
    }
    assert not {name: v for name, v in installs.items() if name in WATCHED}, installs

    outer_after = json.loads(
        subprocess.run(
            [sys.executable, "-c", VERSIONS, *WATCHED], capture_output=True, text=True, check=True
        ).stdout
    )
    assert outer_after == outer_before  # pip worked in the child only
