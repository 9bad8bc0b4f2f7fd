"""The package's import graph: no cycles (lazy imports inside functions included), and the inference side
(models, pipelines, metrics, inference, export) never imports Lightning or the training stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "camouflage_train"
INFERENCE_SIDE = ("models", "pipelines", "metrics", "inference", "export")
TRAINING_STACK = ("lightning", "camouflage_train.modules", "camouflage_train.training")


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``), with its file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules and the ``lightning`` package it imports, at any depth of its code."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                imported.add(base)
                imported |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules}
        edges = set()
        for target in imported:
            if target.split(".")[0] in ("lightning", "pytorch_lightning"):
                edges.add("lightning")
            elif target.startswith("camouflage_train"):
                while target not in modules:
                    target = target.rpartition(".")[0]
                if target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for child in graph.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "camouflage_train.models.conditioning" in graph  # the walk sees the package
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def package_graph() -> dict[str, set[str]]:
    """The import graph between the package's sub-packages (``data``, ``models``, ...; a top-level module is its
    own node): an edge for every module of one importing a module of another."""

    def package(name: str) -> str:
        return name.split(".")[1] if name.count(".") else name

    graph: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        source = package(name)
        graph.setdefault(source, set())
        graph[source] |= {package(t) for t in targets if t != "lightning" and package(t) != source}
    return graph


def test_sub_packages_import_each_other_in_one_direction_only():
    graph = package_graph()
    assert {"data", "models", "pipelines", "miniworld", "utils"} <= set(graph)
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"sub-packages on an import cycle: {cycles} ({ {n: sorted(graph[n]) for n in cycles} })"
    # The layering the README's layout section describes, bottom to top.
    for lower, higher in (("utils", "data"), ("data", "models"), ("models", "pipelines"), ("pipelines", "metrics")):
        assert higher not in _reachable(graph, lower), f"{lower} reaches {higher}"


def test_the_inference_side_never_reaches_lightning_or_training():
    graph = import_graph()
    side = [n for n in graph if n.removeprefix("camouflage_train.").split(".")[0] in INFERENCE_SIDE]
    assert "camouflage_train.pipelines.light" in side and "camouflage_train.export" in side
    for name in side:
        bad = sorted(t for t in _reachable(graph, name) if t.startswith(TRAINING_STACK))
        assert not bad, f"{name} imports {bad}"
    # And at run time, third-party imports included: loading a checkpoint for inference and exporting it.
    code = (
        "import sys, camouflage_train.pipelines.light, camouflage_train.export, camouflage_train.inference, "
        "camouflage_train.metrics.faces, camouflage_train.pipelines.anonymizer; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
        "or m.startswith(('camouflage_train.modules', 'camouflage_train.training'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]", done.stdout
