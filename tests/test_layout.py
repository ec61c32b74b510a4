"""The package's shape: layers with imports pointing one way, no cycles, small modules.

The import graph counts every ``import`` of a dgnh module, also inside
functions. A module may import modules of its own layer or below, never above.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dgnh"

LAYERS = {  # bottom to top; a newcomer finds each concern by its file name
    "core": ["version", "validation", "config", "protocols", "activations", "losses", "model",
             "interop", "batching", "columns", "shard_factors", "sampling", "packing", "phases"],
    "operators": ["operator", "factorization", "lowrank", "nystrom", "hmatrix", "hybrid", "dense",
                  "spectral", "solve", "compress"],
    "data": ["zarr_io", "dataset"],
    "execution": ["backend", "cluster", "gauss_newton", "exact_solve"],
    "persistence": ["store", "checkpoint"],
    "analyses": ["analyses"],
    "applications": ["summary", "job", "analyses_job", "digits", "plot", "demo", "cli",
                     "benchmarks"],
}
LAYER_OF = {mod: rank for rank, mods in enumerate(LAYERS.values()) for mod in mods}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 150


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: pathlib.Path) -> set[str]:
    """The dgnh modules ``name`` imports (at the top or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dgnh"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dgnh":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import store`
    known = modules()
    return {m for m in found if m in known and m != name}


def top(name: str) -> str:
    """The entry of LAYERS a module belongs to (``dgnh.hmatrix.tree`` → ``hmatrix``)."""
    return name.split(".")[1] if "." in name else ""


GRAPH = {name: imported(name, path) for name, path in modules().items()}


def test_every_module_has_a_layer():
    unplaced = sorted(n for n in GRAPH if n != "dgnh" and top(n) not in LAYER_OF)
    assert not unplaced, f"modules without a layer in LAYERS: {unplaced}"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n != "dgnh"))
def test_imports_point_down(name):
    upward = [m for m in GRAPH[name] if m != "dgnh" and LAYER_OF[top(m)] > LAYER_OF[top(name)]]
    assert not upward, f"{name} imports the higher-layer modules {upward}"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(GRAPH[name]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [name, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_modules_and_functions_are_small(name):
    path = modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path} is over {MAX_MODULE_LINES} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {path}: {long}"


def test_import_dgnh_loads_neither_dask_nor_zarr():
    code = ("import dgnh, sys; "
            "print(*(m in sys.modules for m in ('distributed', 'dask', 'zarr', 'scipy.stats')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] * 4


def test_lazy_names_resolve():
    import dgnh

    assert dgnh.open.__module__ == "dgnh.store" and dgnh.save_dataset.__module__ == "dgnh.dataset"
    assert dgnh.DaskBackend.__module__ == "dgnh.cluster"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dgnh.nope  # noqa: B018
