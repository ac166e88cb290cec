"""The layout's rules, checked on the source: core never imports daemon or interop (pure
functions on arrays, DESIGN.md), and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "daemon", "interop")


def _imports() -> dict[str, set[str]]:
    """Module (`pkg.name`) -> the package modules it imports, at any depth in its code."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or node.level == 0:
                    continue
                base = package if node.level == 1 else ""
                target = node.module or ""
                if node.level == 2:  # from ..core.x import y
                    base, _, target = target.partition(".")
                names = [target] if target else [a.name for a in node.names]
                found.update(f"{base}.{name.split('.')[0]}" for name in names)
            graph[f"{package}.{path.stem}"] = found
    return {module: deps & graph.keys() for module, deps in graph.items()}


def test_core_imports_neither_daemon_nor_interop():
    offenders = {m: sorted(d for d in deps if not d.startswith("core."))
                 for m, deps in _imports().items() if m.startswith("core.")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycles():
    graph = _imports()
    cycles = []

    def visit(start: str, module: str, path: list[str]) -> None:
        for dep in graph[module]:
            if dep == start:
                cycles.append(" -> ".join([*path, start]))
            elif dep not in path:
                visit(start, dep, [*path, dep])

    for module in graph:
        visit(module, module, [module])
    assert cycles == []
