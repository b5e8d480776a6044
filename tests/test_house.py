"""The house's structure: no module imports another's private names, and no two zoocli modules
import each other (counting imports inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "zoocli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in ``path``."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for mod, names in _imports(path):
            if mod in MODULES:
                deps.add(mod)
            deps |= {f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES}
        graph[name] = deps - {name}
    return graph


def test_no_module_imports_private_names_of_another():
    bad = []
    for name, path in MODULES.items():
        for mod, names in _imports(path):
            if mod.startswith("zoocli") and mod != name:
                bad += [f"{name}: from {mod} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__") and f"{mod}.{n}" not in MODULES]
    assert bad == []


@pytest.mark.parametrize("a,b", [("zoocli.cli.common", "zoocli.cli.progress"),
                                 ("zoocli.adapters.llava", "zoocli.adapters.offline_llava")])
def test_the_former_cycles_are_gone(a, b):
    graph = _graph()
    assert not (b in graph[a] and a in graph[b])


def test_no_two_modules_import_each_other():
    graph = _graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, ()) and not b.startswith(a + ".") and not a.startswith(b + ".")})
    assert pairs == []
