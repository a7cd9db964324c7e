"""The package's layers (docs/design.md, section 7): a subpackage imports only its own modules and
those of the subpackages below it, and no modules import each other in a cycle. Read from the
source by an AST walk, imports inside functions included (a lazy import is still an import).
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "stepwise"

# The subpackages from the bottom up: each may import those before it, never those after it.
# Each one's __init__ docstring says the same ("Layer i of 8: may import `a`, `b`").
LAYERS = ["contract", "config", "parallel", "data", "models", "loop", "callbacks", "tracking",
          "run"]
# Above every subpackage: the entry points at the package root.
TOP = ("stepwise.main", "stepwise.__main__", "stepwise.eval", "stepwise.predict", "stepwise.verify")
# The root __init__ (the version) imports nothing of stepwise, and Python runs it before any
# module of the package: any module may read it (provenance reads __version__).
PACKAGE = "stepwise"
# What a subpackage's __init__ may import: the lazy exports need importlib, nothing heavy.
INIT_IMPORTS = {"__future__", "importlib", "typing"}


def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imports(module: str) -> list[tuple[str, int]]:
    """(the stepwise module imported, line) for every import in `module`, at any depth."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from its package, up level - 1
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:  # `from stepwise.x import y`: y may be a module
                target = f"{base}.{alias.name}"
                found.append((target if target in modules() else base, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] == PACKAGE]


def _existing(name: str) -> str:
    """The longest prefix of a dotted name that is a module of stepwise."""
    while name not in modules() and "." in name:
        name = name.rpartition(".")[0]
    return name


def layer(module: str) -> int:
    """The module's layer: the index of its subpackage in LAYERS; the root's entry points are
    above them all."""
    if module in TOP:
        return len(LAYERS)
    subpackage = module.split(".")[1]
    assert subpackage in LAYERS, f"{module}: stepwise.{subpackage} has no place in LAYERS"
    return LAYERS.index(subpackage)


def graph() -> dict[str, set[str]]:
    return {module: {_existing(name) for name, _ in imports(module)} for module in modules()}


def test_every_subpackage_has_its_layer():
    found = sorted(p.parent.name for p in SRC.glob("*/__init__.py"))
    assert found == sorted(LAYERS)
    assert sorted(m for m in modules() if m.count(".") == 1 and m.split(".")[1] not in LAYERS) == [
        "stepwise.__main__", "stepwise.eval", "stepwise.main", "stepwise.predict", "stepwise.verify"]


def test_imports_point_down_the_layers():
    upward = []
    for module in modules():
        if module == PACKAGE:
            continue
        for name, line in imports(module):
            target = _existing(name)
            if target != PACKAGE and layer(target) > layer(module):
                upward.append(f"{modules()[module].relative_to(ROOT)}:{line}: {module} "
                              f"imports {name}, a layer above it "
                              f"({LAYERS[layer(module)] if module not in TOP else 'top'} < "
                              f"{LAYERS[layer(target)] if target not in TOP else 'top'})")
    assert not upward, "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _path_back(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module: [a, b, ..., a] (breadth first)."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(edges[node] & members):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    return component


def test_no_import_cycles():
    edges = graph()
    cycles = [_path_back(edges, component) for component in _cycles(edges)]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]] and _cycles({"a": {"b"}, "b": set()}) == []
    edges = {"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"c"}}
    assert _path_back(edges, ["a", "b", "c", "d"]) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_each_init_docstring_states_its_layer(index):
    """The docstring of `stepwise.<sub>/__init__.py` names its layer and the subpackages below it,
    in the order of LAYERS."""
    name = LAYERS[index]
    doc = ast.get_docstring(ast.parse((SRC / name / "__init__.py").read_text())) or ""
    assert f"Layer {index + 1} of {len(LAYERS)}" in doc, doc
    if index == 0:
        assert "imports only its own modules" in doc
    else:
        [allowed] = re.findall(r"may import ([^:.]*(?:\.|$))", doc.replace("\n", " "))[:1] or [""]
        assert re.findall(r"`(\w+)`", allowed) == LAYERS[:index], doc


def test_subpackage_inits_import_nothing_heavy():
    """An __init__ runs whenever a module of its package is imported: a dry run of vector data
    imports no torch through one (tests/integration/test_startup.py runs it)."""
    for path in [SRC / "__init__.py", *SRC.glob("*/__init__.py")]:
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert {n.split(".")[0] for n in names} <= INIT_IMPORTS, (path, names)


@pytest.mark.parametrize("package", ["stepwise.models", "stepwise.data"])
def test_short_targets_are_lazy_attributes_of_their_own_modules(package):
    """`stepwise.models.MLP`, `stepwise.data.digits`, ...: each name is found by stepwise's own
    `components.locate` and by Hydra's `_locate`, and is the object its module defines."""
    import importlib

    from hydra._internal.utils import _locate

    from stepwise.config.components import locate

    exports = importlib.import_module(package)._EXPORTS
    assert exports and all(f"{package}.{module}" in modules() for module in exports.values())
    for name, module in exports.items():
        defined = getattr(importlib.import_module(f"{package}.{module}"), name)
        assert locate("model", f"{package}.{name}") is defined
        assert _locate(f"{package}.{name}") is defined
        assert name in dir(importlib.import_module(package))  # offered for a misspelt name


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {_name(p) for p in SRC.rglob("__init__.py")} | {"stepwise.conf"}
    assert set(setuptools["packages"]) == packages
    assert setuptools["package-dir"]["stepwise.conf"] == "conf" and (ROOT / "conf" / "__init__.py").is_file()
