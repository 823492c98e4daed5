"""The package's layers (docs/design.md): no import cycle, no private name across modules (in the package, tests
and benchmarks), commands are leaves, no test imports a test module, no benchmark edits sys.path. Every import
counts, including those in functions."""
import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "timm_split")


def _modules() -> Dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(mods: Dict[str, str], name: str) -> List[Tuple[str, str]]:
    """``(module, imported name)`` of every timm_split import in module ``name`` (relative ones resolved)."""
    path = mods[name]
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            out += [(mod, a.name) for a in node.names if mod and mod.startswith("timm_split")]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("timm_split")]
    return out


def import_graph() -> Dict[str, Set[str]]:
    """module -> the timm_split modules it imports (a submodule where ``from pkg import sub`` names one)."""
    mods = _modules()
    graph = {}
    for name in mods:
        targets = {f"{m}.{n}" if f"{m}.{n}" in mods else m for m, n in _imports(mods, name)}
        graph[name] = {t for t in targets if t != name and t in mods}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_private_name_imported_across_modules():
    mods = _modules()
    bad = [(name, m, n) for name in mods for m, n in _imports(mods, name)
           if n.startswith("_") and f"{m}.{n}" not in mods]
    assert bad == []


def test_commands_are_leaves_and_training_is_above_the_library():
    graph = import_graph()
    for name, targets in graph.items():
        if not name.startswith("timm_split.commands"):
            assert not [t for t in targets if t.startswith("timm_split.commands")], name
        if not name.startswith(("timm_split.commands", "timm_split.training")) and name != "timm_split":
            assert not [t for t in targets if t.startswith("timm_split.training")], name


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_no_test_module_imports_no_private_names_and_no_sys_path_edits(folder):
    bad = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if not f.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(dirpath, f)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("tests", "test_models"):
                    bad.append((f, node.module))
                if isinstance(node, ast.Import) and any(a.name.startswith("tests.") for a in node.names):
                    bad.append((f, "import tests"))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timm_split"):
                    bad += [(f, f"{node.module}.{a.name}") for a in node.names if a.name.startswith("_")]
                if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys" \
                        and folder == "benchmarks":
                    bad.append((f, "sys.path"))
    assert bad == []
