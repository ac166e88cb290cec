"""The layout's rules, checked on the source: core never imports daemon or interop (pure
functions on arrays), and no module imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "daemon", "interop")


def _imports() -> dict[str, set[str]]:
    """Module (`core.training.loop`) -> the project modules it imports, at any depth in its
    code (lazy imports inside functions count: they make cycles all the same)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = (path, ".".join(parts[:-1]))  # (file, its package)
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            candidates = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found.update(c for c in candidates if c in modules and c != name)
            found.update(f"{target}.{a.name}" for a in node.names
                         if f"{target}.{a.name}" in modules)
        graph[name] = found
    return graph


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


def test_the_daemons_modules_import_no_torch():
    # Watching, queueing, leases, status and pages need no network: torch (about 1.7 s to
    # import here, and 200 MiB) comes in only where a model is run (the workers, and the
    # registry's smoke test). It once came in through the output-file names, which lived
    # beside the PNG writer, for `tomolive status` too.
    code = ("import sys, tomolive.daemon.cli, tomolive.daemon.service\n"
            "print(' '.join(m for m in ('torch', 'skimage', 'pandas') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"imported by the daemon's main process: {run.stdout}"
