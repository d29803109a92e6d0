"""Layers only point down, and no module imports itself in a circle.

Every ``import`` of a ``dfmsd_cli`` module is read with ``ast`` (module level, inside
functions, under ``TYPE_CHECKING``: all of them count). Each subpackage has a layer (bottom to
top, ``LAYERS``); a module may import its own subpackage, anything in a lower layer, and another
subpackage of its own layer as long as the subpackages do not import each other. The order is
documented in docs/architecture.md ("Layers").
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import dfmsd_cli

PKG = Path(dfmsd_cli.__file__).parent
ROOT = "dfmsd_cli"

# Bottom to top. A unit is a subpackage of dfmsd_cli (or the top-level module errors.py).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "utils", "__init__"),  # ground: UserError, atomic IO, safe loading, console
    ("data",),  # datasets, geometry, views, ME enhancement
    ("models",),  # detector zoo, weight files
    ("store",),  # precompute teachers -> zarr store, reader
    ("eval",),  # inference + COCO metrics (the end-of-run validation of a run)
    ("engine",),  # the shared training machinery (used by train and distill)
    ("distill",),  # losses, methods, the stage-wise distillation
    ("bench", "viz"),  # measurements; figures
    ("demo",),  # the end-to-end demo (draws with viz)
    ("cli", "__main__"),  # typer commands
)
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """``dfmsd_cli.store.reader`` -> ``store``; the package's own ``__init__`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported dfmsd_cli module)`` for every import in the file.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
    """
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != ROOT:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if _is_module(sub) else target))
    return out


def import_graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def _where(module: str, line: int) -> str:
    path = PKG.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return f"{path.relative_to(PKG.parent)}:{line}"


def layer_violations(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Imports from a lower layer to a higher one, and of units missing from ``LAYERS``."""
    out = []
    for module, edges in graph.items():
        src = unit_of(module)
        if src not in RANK:
            out.append(f"{module}: subpackage '{src}' has no layer in LAYERS")
            continue
        for line, target in edges:
            dst = unit_of(target)
            if dst in RANK and RANK[dst] > RANK[src]:
                out.append(
                    f"{_where(module, line)} imports {target}: '{src}' (layer {RANK[src]}) "
                    f"may not import '{dst}' (layer {RANK[dst]})"
                )
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe_cycle(comp: list[str], graph: dict[str, list[tuple[int, str]]], unit) -> str:
    members = set(comp)
    arrows = sorted(
        {
            f"{_where(m, line)} -> {t}"
            for m, edges in graph.items()
            for line, t in edges
            if unit(m) in members and unit(t) in members and unit(m) != unit(t)
        }
    )
    return f"circle {' <-> '.join(comp)}: " + "; ".join(arrows)


def module_cycles(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    g = {m: {t for _, t in edges if t != m} for m, edges in graph.items()}
    return [_describe_cycle(c, graph, lambda m: m) for c in cycles(g)]


def _ground(module: str) -> str:
    u = unit_of(module)
    return "ground" if RANK.get(u) == 0 else u


def unit_cycles(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Circles between subpackages (the ground layer counts as one unit)."""
    g: dict[str, set[str]] = defaultdict(set)
    for m, edges in graph.items():
        g[_ground(m)] |= {_ground(t) for _, t in edges if _ground(t) != _ground(m)}
    return [_describe_cycle(c, graph, _ground) for c in cycles(g)]


def test_every_import_points_down():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_circle_between_modules():
    bad = module_cycles(import_graph())
    assert not bad, "import circles:\n" + "\n".join(bad)


def test_no_import_circle_between_subpackages():
    bad = unit_cycles(import_graph())
    assert not bad, "import circles between subpackages:\n" + "\n".join(bad)


# The store's write side; training and figures read stores through reader/schema only.
STORE_WRITE_SIDE = ("precompute", "writer", "create", "lock", "repair", "measure")
STORE_READERS = ("engine", "distill", "viz")


def test_training_and_figures_use_only_the_stores_read_side():
    write = {f"{ROOT}.store.{m}" for m in STORE_WRITE_SIDE}
    bad = [
        f"{_where(m, line)} imports {t}: move the helper below the store (data/ or models/)"
        for m, edges in import_graph().items()
        if unit_of(m) in STORE_READERS
        for line, t in edges
        if t in write
    ]
    assert not bad, "the store's write side imported by a reader:\n" + "\n".join(bad)


def test_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an upward import inside a function and a circle are reported."""
    graph = {
        "dfmsd_cli.data.a": [(3, "dfmsd_cli.models.b")],  # data -> models: upward
        "dfmsd_cli.models.b": [(5, "dfmsd_cli.models.c")],
        "dfmsd_cli.models.c": [(7, "dfmsd_cli.models.b")],
    }
    monkeypatch.setattr(f"{__name__}._where", lambda m, line: f"{m}:{line}")
    assert layer_violations(graph) == [
        "dfmsd_cli.data.a:3 imports dfmsd_cli.models.b: 'data' (layer 1) may not import "
        "'models' (layer 2)"
    ]
    assert module_cycles(graph) == [
        "circle dfmsd_cli.models.b <-> dfmsd_cli.models.c: "
        "dfmsd_cli.models.b:5 -> dfmsd_cli.models.c; dfmsd_cli.models.c:7 -> dfmsd_cli.models.b"
    ]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from dfmsd_cli.eval import inference\n")
    monkeypatch.setattr(f"{__name__}.PKG", tmp_path)
    assert imports_of(src) == [(2, "dfmsd_cli.eval")]


@pytest.mark.parametrize("unit", sorted({unit_of(m) for m in import_graph()}))
def test_every_subpackage_has_a_layer(unit):
    assert unit in RANK, f"add '{unit}' to LAYERS in tests/test_layering.py and the docs"
