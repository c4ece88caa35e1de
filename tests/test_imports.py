"""The package's modules import one another without a cycle.

Every ``import pyro_physvae...`` and ``from pyro_physvae... import ...`` (and relative import)
of every module is read with :mod:`ast`, at module level and inside functions alike (a lazy
import still ties two modules together), and the dependency graph is searched for a cycle.
``models/`` and ``guides/`` are installed as ``pyro_physvae.models`` and
``pyro_physvae.guides`` (see pyproject.toml) and are part of the graph.

Importing ``pyro_physvae.a.b`` also runs the package ``__init__`` files above it; those
implicit edges are left out, as Python resolves them (a package is importable while its
``__init__`` runs), so only the modules named in import statements count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pyro_physvae"
#: Folders whose modules are installed as ``pyro_physvae.<folder name>`` (pyproject.toml).
FOLDERS = {PACKAGE: ROOT / "pyro_physvae", f"{PACKAGE}.models": ROOT / "models",
           f"{PACKAGE}.guides": ROOT / "guides"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed package."""
    modules: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of a ``from X import ...`` statement in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``None``: outside the package)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            # ``from pkg import name``: the submodule pkg.name where there is one, else pkg.
            names = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        targets.update(m for m in (_owner(n, modules) for n in names) if m is not None)
    targets.discard(module)
    return targets


def dependency_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle ``[a, b, ..., a]`` of ``graph`` (module -> imported modules), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def _edges(graph: dict[str, set[str]]) -> Iterator[tuple[str, str]]:
    return ((a, b) for a, targets in graph.items() for b in targets)


def test_the_package_has_no_import_cycle():
    graph = dependency_graph()
    assert len(graph) > 20, "the package's modules were not found"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_lazy_and_package_relative_imports():
    graph = dependency_graph()
    edges = set(_edges(graph))
    # A function-level import (the built-in factories in systems.py import the zoo lazily).
    assert ("pyro_physvae.systems", "pyro_physvae.models.pendulum") in edges
    # ``from pyro_physvae.data.io import ...`` and models/ mapped into the package.
    assert ("pyro_physvae.systems", "pyro_physvae.data.io") in edges
    assert ("pyro_physvae.models", "pyro_physvae.models.pendulum") in edges


@pytest.mark.parametrize("source, expected", [
    ("import pyro_physvae.a\n", {"pyro_physvae.a"}),
    ("def f():\n    from pyro_physvae import a, b\n", {"pyro_physvae.a", "pyro_physvae"}),
    ("from . import c\n", {"pyro_physvae.c"}),
    ("from .sub.d import thing\n", {"pyro_physvae.sub.d"}),
    ("import numpy\nfrom torch import nn\n", set()),
])
def test_import_statements_are_resolved(tmp_path, source, expected):
    modules = {name: tmp_path / f"{name}.py" for name in
               ("pyro_physvae", "pyro_physvae.a", "pyro_physvae.c", "pyro_physvae.sub.d", "pyro_physvae.m")}
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported_modules("pyro_physvae.m", path, modules) == expected


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
