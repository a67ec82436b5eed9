"""The import contract: the framework core never imports the testbed, and no module imports itself
back through others.

    common/   shared helpers and errors; imports nothing else of smolcluster
    core/     net, training, algorithms; may import common and resources
    testbed/  topology, profiles, linkemu, sim, faults, report; may import core and common
    deploy/, bench/, cli   on top; may import anything

Every import counts, including those inside functions (they are how cycles hide).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "smolcluster"

# layer -> the smolcluster subpackages it may import
ALLOWED = {
    "common": {"common", "resources"},
    "resources": {"resources"},
    "core": {"common", "resources", "core"},
    "testbed": {"common", "resources", "core", "testbed"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every smolcluster import in a file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found += [(node.lineno, f"{module}.{a.name}" if module == "smolcluster" else module) for a in node.names]
    return [(line, m) for line, m in found if m == "smolcluster" or m.startswith("smolcluster.")]


def _layer(module: str) -> str:
    """The subpackage of smolcluster a module belongs to ("" for the top package itself, which is empty)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if layer not in ALLOWED:
            continue
        for line, module in _imports(path):
            if _layer(module) not in ALLOWED[layer] | {""}:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} ({layer}/ may import only "
                           f"{', '.join(sorted(ALLOWED[layer]))})")
    return out


def test_core_never_imports_the_testbed():
    assert _violations() == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The contract must not be blind to the imports that hide cycles."""
    f = PACKAGE / "core" / "_layering_probe.py"
    f.write_text("def f():\n    from smolcluster.testbed import topology\n")
    try:
        assert any("_layering_probe.py:2 imports smolcluster.testbed" in v for v in _violations())
    finally:
        f.unlink()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """smolcluster module -> the smolcluster modules it imports anywhere in its file (`from pkg import mod`
    is an edge to pkg.mod when that is a module, else to pkg)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target not in (name, "smolcluster"):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(_path_within(graph, group, v))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path_within(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest way from `start` back to itself inside `group` (breadth first)."""
    paths = {w: [start, w] for w in graph[start] if w in group}
    while start not in paths:
        paths = {w: p + [w] for p in paths.values() for w in graph[p[-1]] if w in group and w not in p[1:]} | paths
    return paths[start]


def test_no_import_cycles():
    assert [" -> ".join(c) for c in _cycles(_import_graph())] == []


def test_the_cycle_check_sees_imports_inside_functions():
    a, b = PACKAGE / "testbed" / "_cycle_probe_a.py", PACKAGE / "testbed" / "_cycle_probe_b.py"
    a.write_text("def f():\n    from smolcluster.testbed import _cycle_probe_b\n")
    b.write_text("from smolcluster.testbed._cycle_probe_a import f\n")
    try:
        assert ["smolcluster.testbed._cycle_probe_a -> smolcluster.testbed._cycle_probe_b -> smolcluster.testbed._cycle_probe_a"] \
            == [" -> ".join(c) for c in _cycles(_import_graph())]
    finally:
        a.unlink()
        b.unlink()


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_every_layer_exists(layer):
    assert (PACKAGE / layer / "__init__.py").is_file()
