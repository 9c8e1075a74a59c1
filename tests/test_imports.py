"""Imports run one way (docs/design.md, "The modules"): torchpcg modules import each other at module
top only, the module graph has no circle (so any import order works), and the tools and front ends sit
above what they use. Read from the source (ast), nothing is imported."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "torchpcg"
_MODULE_NAMES = [path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"] + ["models"]
# demo.py imports the reference models when it builds one: importing them registers their ops.
LATE_IMPORTS_ALLOWED = {("demo", "models")}


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def _targets(node: ast.stmt) -> set[str]:
    """The torchpcg modules an import statement reaches: 'from .plan import x', 'from . import vlm',
    'import torchpcg.vision', 'from torchpcg.models import y' -> {'plan'}, {'vlm'}, {'vision'}, {'models'}."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 1:
        names = [f"torchpcg.{node.module}"] if node.module else [f"torchpcg.{a.name}" for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module == "torchpcg":
        names = [f"torchpcg.{a.name}" for a in node.names]  # a name or a submodule; kept if a submodule
    elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
    else:
        return set()
    known = set(_MODULE_NAMES)
    return {n.split(".")[1] for n in names if n.startswith("torchpcg.") and n.split(".")[1] in known}


def _top_level_edges() -> dict[str, set[str]]:
    return {name: set().union(*(_targets(node) for node in tree.body)) - {name} for name, tree in _modules().items()}


def test_no_torchpcg_import_inside_a_function():
    late = []
    for name, tree in _modules().items():
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    late += [(name, t, node.lineno) for t in _targets(node) if (name, t) not in LATE_IMPORTS_ALLOWED]
    assert not late, f"imports inside functions (move them to the module top): {late}"


def test_module_imports_have_no_circle():
    edges = _top_level_edges()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges.get(name, ())):
            assert state.get(target) != 1, "import circle: " + " -> ".join(path[path.index(target):] + [target])
            if target in edges and not state.get(target):
                visit(target, path + [target])
        state[name] = 2

    for name in edges:
        if not state.get(name):
            visit(name, [name])


@pytest.mark.parametrize("module, never", [
    ("plan", {"backend", "explain", "debug", "stable", "front", "vlm"}),
    ("debug", {"backend", "explain", "stable", "front", "vlm"}),
    ("stable", {"vlm", "front", "vision", "explain", "backend"}),
    # stable's helpers: each does one job for stable (and explain), importing only the bottom modules
    ("token_inputs", {"stable", "stable_buffers", "recompiles", "direct", "debug", "backend", "runtime", "front",
                      "vlm", "vision", "explain"}),
    ("stable_buffers", {"stable", "token_inputs", "recompiles", "direct", "debug", "backend", "runtime", "front",
                        "vlm", "vision", "explain"}),
    ("recompiles", {"stable", "token_inputs", "stable_buffers", "direct", "debug", "backend", "runtime", "front",
                    "vlm", "vision", "explain"}),
    # padding analysis, bottom up: token_shapes and padding_ops -> padding_rules -> padding; verify
    # runs graphs and reads token shapes only. None of them knows the split, runtime or backend.
    ("token_shapes", {"padding_ops", "padding_rules", "padding", "verify", "split", "runtime", "full", "backend"}),
    ("padding_ops", {"token_shapes", "padding_rules", "padding", "verify", "split", "runtime", "full", "backend"}),
    ("padding_rules", {"padding", "verify", "split", "runtime", "full", "backend"}),
    ("padding", {"verify", "split", "runtime", "full", "backend"}),
    ("verify", {"padding", "padding_rules", "padding_ops", "split", "runtime", "full", "backend"}),
    ("runtime", {"backend", "explain", "debug", "plan", "stable", "front", "vlm", "vision"}),
    # the graph engine: below its owners (runtime, full, vision), above graphs, errors and stats
    ("engine", {"runtime", "full", "vision", "backend", "explain", "debug", "plan", "stable", "front", "vlm",
                "capture", "split", "compilers", "padding", "address_sets"}),
    ("config", {"backend", "runtime", "stable", "token_inputs", "stable_buffers", "recompiles", "front"}),
])
def test_lower_modules_never_import_upper_ones(module, never):
    assert not _top_level_edges()[module] & never

