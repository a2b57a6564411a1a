"""The package's import graph, built from the source with ``ast`` (module-level and function-level imports,
relative and absolute): no circle; the solvers are pure torch; nothing below the edge (``rankseg_monai.app``)
imports it; the core imports no MONAI adapter.  Every failure lists the offending edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "rankseg_monai"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: the core: no MONAI adapter, no edge module below it
CORE = ("options", "functional", "guard", "activation", "calibrator", "_arrays", "_files", "solvers")
#: the MONAI adapters and the edge
ABOVE_CORE = ("transforms", "handlers", "metrics", "calibration", "app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str], list[str]]:
    """(package modules imported, top-level external packages imported, unresolved package imports) of a module;
    every import statement counts, also those inside functions."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    internal, external, unresolved = set(), set(), []

    def resolve(target: str, names: list[str]) -> None:
        if target.split(".")[0] != PACKAGE:
            external.add(target.split(".")[0])
            return
        found = False
        for n in names:  # `from pkg import submodule` imports the submodule
            if f"{target}.{n}" in modules:
                internal.add(f"{target}.{n}")
                found = True
        if target in modules and (not found or any(f"{target}.{n}" not in modules for n in names)):
            internal.add(target)
            found = True
        if not found:
            unresolved.append(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            resolve(target, [a.name for a in node.names])
    internal.discard(name)
    return internal, external, unresolved


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    edges, external, unresolved = {}, {}, []
    for name, path in modules.items():
        edges[name], external[name], bad = _imports(name, path, modules)
        unresolved += [f"{name} -> {b}" for b in bad]
    assert not unresolved, "imports of package modules that do not exist:\n" + "\n".join(unresolved)
    return edges, external


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1:] or PACKAGE


def _in(name: str, prefixes) -> bool:
    short = _short(name)
    return any(short == p or short.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_every_kind_of_import(graph):
    """The builder is not blind: relative, absolute, `from . import x` and function-level imports all appear."""
    edges, external = graph
    assert f"{PACKAGE}.solvers.rma" in edges[f"{PACKAGE}.functional"]  # from .solvers import rma as _rma
    assert f"{PACKAGE}.solvers.exact" in edges[f"{PACKAGE}.functional"]  # inside a function
    assert f"{PACKAGE}.app.cli" in edges[f"{PACKAGE}.__main__"]
    assert f"{PACKAGE}.app.io" in edges[f"{PACKAGE}.app.cli"]  # from . import io as rio
    assert f"{PACKAGE}.functional" in edges[f"{PACKAGE}.calibration.report"]  # from ..functional import decide
    assert "monai" in external[f"{PACKAGE}.transforms"] and "torch" in external[f"{PACKAGE}.solvers.rma"]
    assert len(edges) >= 30


def test_no_import_circle(graph):
    edges, _ = graph
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(map(_short, stack[stack.index(nxt):] + [nxt])))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_solvers_are_pure_torch(graph):
    edges, external = graph
    bad = [f"{_short(m)} -> {_short(t)}" for m in edges if _in(m, ("solvers",)) for t in sorted(edges[m])
           if not _in(t, ("solvers",))]
    bad += [f"{_short(m)} -> {e}" for m in edges if _in(m, ("solvers",)) for e in sorted(external[m])
            if e in ("monai", "ignite")]
    assert not bad, "solver modules importing outside rankseg_monai.solvers (or MONAI/Ignite):\n" + "\n".join(bad)


def test_nothing_below_the_edge_imports_it(graph):
    edges, _ = graph
    bad = [f"{_short(m)} -> {_short(t)}" for m in edges if not _in(m, ("app", "__main__"))
           for t in sorted(edges[m]) if _in(t, ("app",))]
    assert not bad, "modules outside rankseg_monai.app importing it:\n" + "\n".join(bad)


def test_the_core_imports_no_adapter(graph):
    edges, external = graph
    bad = [f"{_short(m)} -> {_short(t)}" for m in edges if _in(m, CORE) for t in sorted(edges[m])
           if _in(t, ABOVE_CORE)]
    bad += [f"{_short(m)} -> {e}" for m in edges if _in(m, CORE) for e in sorted(external[m])
            if e in ("monai", "ignite")]
    assert not bad, "core modules importing transforms/handlers/metrics/calibration/app or MONAI:\n" + "\n".join(bad)


def test_the_core_loads_without_monai():
    """At run time too: importing the functional API, the options, the guard, the activation and every solver
    leaves MONAI (and Ignite) out of sys.modules."""
    code = (
        "import sys, importlib\n"
        "import rankseg_monai, rankseg_monai.functional, rankseg_monai.options, rankseg_monai.guard\n"
        "import rankseg_monai.activation, rankseg_monai.calibrator, rankseg_monai._arrays, rankseg_monai._files\n"
        "for m in ('rma', 'ba', 'exact', 'multiclass', 'pruning', 'objectives', 'validation', '_stream', '_sorted'):\n"
        "    importlib.import_module('rankseg_monai.solvers.' + m)\n"
        "loaded = sorted(k for k in sys.modules if k.split('.')[0] in ('monai', 'ignite'))\n"
        "print(loaded[:5])\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert proc.returncode == 0, f"MONAI/Ignite loaded by the core: {proc.stdout} {proc.stderr[-2000:]}"


@pytest.mark.parametrize("helper", ["oracle.py", "generators.py"])
def test_oracles_and_generators_are_independent_of_the_package(helper):
    """A test's reference values and inputs never come from the code under test."""
    tree = ast.parse((Path(__file__).resolve().parent / helper).read_text())
    bad = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
           and any((a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] == PACKAGE
                   for a in n.names)]
    assert not bad, f"tests/{helper} imports the package:\n" + "\n".join(bad)
