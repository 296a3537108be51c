"""The floors of the house (README "Layout"): every import inside ``explainer`` points down a floor or
stays on its own, and the packages' import graph has no cycle. Imports under ``if TYPE_CHECKING:`` are
annotations, not imports, and are not counted; imports inside functions are."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "explainer"

#: each unit (a top-level module or package of ``explainer``) and its floor, ground first
FLOORS = {
    0: {"errors", "limits", "validation", "progress", "threads", "cache", "version", "registries"},
    1: {"graph", "io", "samples"},
    2: {"convert", "model"},
    3: {"zoo"},
    4: {"runtime"},
    5: {"evaluate", "imputation", "viz"},
    6: {"methods", "export", "sanity"},
    7: {"report", "dataset", "serve", "cli", "walkthrough", "batch_evaluate", "pages", "__main__", "__init__"},
}
FLOOR = {unit: floor for floor, units in FLOORS.items() for unit in units}


def _unit(module: str) -> str:
    """explainer.runtime.classifier -> runtime; explainer -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every explainer import in the file, TYPE_CHECKING blocks excepted."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "explainer" or target.startswith("explainer."):
                if target == "explainer":  # from . import errors: the names are units
                    found.extend((node.lineno, f"explainer.{a.name}") for a in node.names)
                else:
                    found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("explainer."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {unit it imports -> ['file:line', ...]}"""
    edges: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = _unit(_module_name(path))
        for line, target in imports(path):
            dest = _unit(target)
            if dest != source:
                edges.setdefault(source, {}).setdefault(dest, []).append(f"{path.relative_to(ROOT.parent)}:{line}")
    return edges


def test_every_unit_has_a_floor():
    units = {_unit(_module_name(p)) for p in ROOT.rglob("*.py")}
    assert units - set(FLOOR) == set(), "give each new module or package a floor in FLOORS and README's Layout"


def test_no_import_runs_up_a_floor():
    upward = [f"{where}: {source} (floor {FLOOR[source]}) imports {dest} (floor {FLOOR[dest]})"
              for source, targets in graph().items() for dest, wheres in targets.items()
              if FLOOR.get(dest, -1) > FLOOR.get(source, -1) for where in wheres]
    assert upward == []


def test_no_package_cycle():
    edges = {s: set(t) for s, t in graph().items()}
    seen, stack, cycles = set(), [], []

    def walk(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            walk(nxt)
        stack.pop()

    for node in sorted(edges):
        walk(node)
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: an import of a method from the runtime floor is seen (and a
    TYPE_CHECKING one is not)."""
    bad = tmp_path / "explainer" / "runtime" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..report import explain\n"
                   "def f():\n    from ..methods.registry import get_method\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path / "explainer"
    try:
        assert imports(bad) == [(5, "explainer.methods.registry")]
    finally:
        ROOT = saved


def main() -> None:
    """python tests/test_floors.py: the unit import graph, one line per edge, with the floors."""
    for source, targets in sorted(graph().items(), key=lambda kv: (FLOOR.get(kv[0], 9), kv[0])):
        for dest in sorted(targets, key=lambda d: (FLOOR.get(d, 9), d)):
            print(f"{FLOOR.get(source)}:{source} -> {FLOOR.get(dest)}:{dest} ({len(targets[dest])})")


if __name__ == "__main__":
    main()


def test_the_package_imports_from_a_plain_checkout(tmp_path):
    """``explainer`` and ``explainer.zoo`` import from a copy of the source tree on PYTHONPATH, as from a
    checkout that was never installed (the zoo was once a folder remapped at install time)."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT, tmp_path / "explainer", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import explainer, explainer.zoo, explainer.zoo.registry as r; "
            "print(explainer.zoo.__file__); print(r.DEFAULT in r.REGISTRY)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    where, found = out.stdout.split()
    assert Path(where).is_relative_to(tmp_path) and found == "True"
