"""The package's import graph has no cycles: no module imports back, directly or through others, from a module that
imports it.

The graph is built from the source with `ast`, so it counts every import, those inside functions too (they run
later, but a cycle among them still means two modules each need the other), in both forms (`import quark.x`,
`from .x import y`, `from . import x`), plus `importlib.import_module("quark....")` with a literal name. An import of
`pkg.mod` is an edge to that module only: the implicit import of the parent package's `__init__` is not an edge
(otherwise every module that `quark/__init__.py` imports would sit on a cycle with it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG_ROOT = Path(__file__).resolve().parents[1] / "quark"


def module_files(root: Path = PKG_ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package (`quark.eval` for quark/eval/__init__.py)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _resolve_from(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, is_pkg, node)
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            found.update(subs)
            if len(subs) < len(node.names):  # some names are attributes of `target` itself
                found.add(target)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m in known and m != module}


def import_graph(root: Path = PKG_ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {mod: imports_of(mod, path, set(files)) for mod, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles among the modules, each as a closed path a -> ... -> a: for every strongly connected component with
    more than one module (Tarjan), the shortest cycle through each of its modules, duplicates dropped."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles, seen = [], set()
    for comp in components:
        for start in comp:
            cycle = _cycle_through(graph, start, set(comp))
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def _cycle_through(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest closed path from `start` back to itself (breadth-first, inside its component)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(members)}")


def test_graph_sees_every_import_form(tmp_path):
    pkg = tmp_path / "quark"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import quark.c\n")
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('quark.d')\n")
    (pkg / "d.py").write_text("from quark import a\nfrom . import sub\n")
    graph = import_graph(pkg)
    assert graph["quark.a"] == {"quark.sub.b"} and graph["quark.sub.b"] == {"quark.c"}
    assert graph["quark.c"] == {"quark.d"} and graph["quark.d"] == {"quark.a", "quark.sub"}
    assert find_cycles(graph) == [["quark.a", "quark.sub.b", "quark.c", "quark.d", "quark.a"]]
    (pkg / "d.py").write_text("from quark import sub\n")
    assert find_cycles(import_graph(pkg)) == []


def test_package_has_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
