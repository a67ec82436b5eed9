"""The import contract: the framework core never imports the testbed.

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


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_every_layer_exists(layer):
    assert (PACKAGE / layer / "__init__.py").is_file()
