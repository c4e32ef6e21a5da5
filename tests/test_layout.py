"""The package's shape: imports flow server → llm, training → run → errors; inside training the
two wings (vision, lm) stand on the harness and never on each other; a training job never loads
the web app."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ml_engine

PACKAGE = Path(ml_engine.__file__).resolve().parent
# what each layer may not import, at module level or inside functions
FORBIDDEN = {
    "run": ("ml_engine.training", "ml_engine.llm", "ml_engine.server"),
    "training": ("ml_engine.llm", "ml_engine.server"),
    "llm": ("ml_engine.training", "ml_engine.server"),
}
# the one crossing: the exporter writes GGUF files with llm's writer and quantizer (which know
# nothing of training); everything else of llm stays out of training
ALLOWED = {
    "training/lm/export.py": (
        "ml_engine.llm.gguf_writer",
        "ml_engine.llm.quantize",
        "ml_engine.llm.imatrix",
        "ml_engine.llm.imatrix_gate",
        "ml_engine.llm.variants",
    ),
    # the importance matrix a trained model's forward hooks fill, in llm's imatrix format
    "training/lm/imatrix_hooks.py": ("ml_engine.llm.imatrix",),
}


# inside training: the harness (the files directly in training/) imports neither wing, and
# finds module classes and networks through the registry's entry points; the wings import the
# harness, never each other
TRAINING_FORBIDDEN = {
    "training/*.py": ("ml_engine.training.vision", "ml_engine.training.lm"),
    "training/vision/**/*.py": ("ml_engine.training.lm",),
    "training/lm/**/*.py": ("ml_engine.training.vision",),
}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions and branches;
    ``from a.b import c`` counts as ``a.b`` and ``a.b.c`` (``c`` may be a module:
    ``from ml_engine.training import vision``). Relative imports are not counted (the package
    uses none)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == module or name.startswith(f"{module}.") for module in modules)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_flow_one_way(layer: str) -> None:
    offending = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in sorted(imported_modules(path))
        if _within(name, FORBIDDEN[layer])
        and not _within(name, ALLOWED.get(path.relative_to(PACKAGE).as_posix(), ()))
    ]
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("files", sorted(TRAINING_FORBIDDEN))
def test_the_harness_and_the_wings_keep_apart(files: str) -> None:
    paths = sorted(PACKAGE.glob(files))
    assert paths, files
    offending = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in paths
        for name in sorted(imported_modules(path))
        if _within(name, TRAINING_FORBIDDEN[files])
    ]
    assert not offending, "\n".join(offending)


def test_the_allowed_crossings_are_still_needed() -> None:
    # an allowance that nothing uses any more would silently widen the rule
    for relative, names in ALLOWED.items():
        assert set(names) <= imported_modules(PACKAGE / relative), relative


def test_package_root_holds_only_its_face() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "errors.py"]


@pytest.mark.slow
def test_a_training_job_does_not_load_the_web_app() -> None:
    # the server adds this callback to each training job it starts
    script = (
        "import sys, ml_engine.training.progress, ml_engine.training.train\n"
        "loaded = [m for m in ('fastapi', 'starlette', 'uvicorn', 'ml_engine.server') "
        "if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
