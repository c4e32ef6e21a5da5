"""Imports inside ``ml_engine.llm`` flow one way: no circle, not even one hidden by an import
inside a function."""

from __future__ import annotations

from pathlib import Path

import ml_engine.llm
from tests.test_layout import imported_modules

LLM = Path(ml_engine.llm.__file__).resolve().parent
PACKAGE = "ml_engine.llm"
# circles allowed, as (module, module, ...) with the reason: none
ALLOWED_CIRCLES: dict[tuple[str, ...], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LLM).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(path: Path, modules: set[str]) -> set[str]:
    """The llm modules this file imports anywhere in it (module level, functions, branches).

    ``from package import name`` imports the submodule when ``name`` is one. Importing a
    module runs its packages' ``__init__`` first, so those count too, except the importer's own
    packages: they have run before it."""
    found = imported_modules(path)
    importer = _module_name(path)
    own = set(_ancestors(importer))
    targets = set()
    for name in found & modules:
        targets.update(m for m in [name, *_ancestors(name)] if m in modules and m not in own)
    return targets - {importer}


def import_graph() -> dict[str, set[str]]:
    files = sorted(LLM.rglob("*.py"))
    modules = {_module_name(path) for path in files}
    return {_module_name(path): _imported(path, modules) for path in files}


def _circle_through(graph: dict[str, set[str]], start: str) -> tuple[str, ...] | None:
    """The shortest circle from ``start`` back to itself (breadth first)."""
    paths = {start: (start,)}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt == start:
                return paths[node]
            if nxt not in paths:
                paths[nxt] = (*paths[node], nxt)
                queue.append(nxt)
    return None


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """One circle through each module that lies on any, each written from its smallest name."""
    found = set()
    for module in graph:
        circle = _circle_through(graph, module)
        if circle:
            turn = circle.index(min(circle))
            found.add(circle[turn:] + circle[:turn])
    return found


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    # open_backend imports the llama.cpp backend only when that backend is asked for
    assert "ml_engine.llm.backends.llama_cpp" in graph["ml_engine.llm.backends"]
    # a submodule import runs its package's __init__: measure → backends
    assert "ml_engine.llm.backends" in graph["ml_engine.llm.measure"]
    # and a package is not counted as imported by its own submodules
    assert "ml_engine.llm.backends" not in graph["ml_engine.llm.backends.llama_cpp"]


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == {("a", "b", "c")}
    assert circles({"a": {"b"}, "b": set()}) == set()


def test_llm_imports_have_no_circle() -> None:
    graph = import_graph()
    unexpected = circles(graph) - set(ALLOWED_CIRCLES)
    assert not unexpected, "\n".join(" → ".join((*c, c[0])) for c in sorted(unexpected))
