"""The import direction of the package (docs/architecture.md): every import, function-level ones included, points
down the layers, and no two packages import each other, directly or around a loop.

:data:`LAYERS` is the one place that says which package is in which layer; a new package must be added to it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("dscovid", "dataset_conversion")

#: Layer of each package (or top-level module), lowest first. A module may import from its own layer and below.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("dscovid", "dscovid.errors", "dscovid.roots", "dscovid.parallel", "dscovid.io"),
    "contracts": ("dscovid.plans", "dscovid.results", "dscovid.measurements"),
    "algorithms": ("dscovid.preprocessing", "dscovid.model", "dscovid.inference", "dscovid.fingerprint"),
    "stages": ("dataset_conversion", "dscovid.planning", "dscovid.training", "dscovid.prediction",
               "dscovid.evaluation", "dscovid.analysis"),
    "entry points": ("dscovid.cli", "dscovid.demo"),
}
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
UNITS = {unit: layer for layer, units in LAYERS.items() for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for source in SOURCES for path in sorted((ROOT / source).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, first-party module) of every import in the file, at any depth (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from package import module`` imports the module; ``from module import name`` the module itself.
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
                      for alias in node.names]
    return [(line, module) for line, module in found if module.split(".")[0] in SOURCES]


def _unit(module: str) -> str | None:
    """The longest key of :data:`UNITS` that is ``module`` or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in UNITS:
            return ".".join(parts[:end])
    return None


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_scan_sees_the_package_and_its_imports():
    # Guards the test itself: a path or parsing mistake would make every other check pass vacuously.
    assert {"dscovid.prediction.predict", "dscovid.training.base_trainer", "dataset_conversion.synthetic"} <= set(MODULES)
    assert any(module == "dscovid.plans.presets" for _, module in EDGES["dscovid.planning.planner"])
    assert any(module == "dscovid.prediction.predict" for _, module in EDGES["dscovid.cli.predict"])  # in main()
    assert any(module == "dscovid.measurements.findings" for _, module in EDGES["dataset_conversion.synthetic_findings"])


def test_every_module_has_a_layer():
    assert [name for name in MODULES if _unit(name) is None] == []


@pytest.mark.parametrize("layer", list(LAYERS))
def test_imports_point_down_the_layers(layer):
    upward = []
    for name, imports in EDGES.items():
        unit = _unit(name)
        if UNITS.get(unit) != layer:
            continue
        for line, module in imports:
            target = _unit(module)
            assert target is not None, f"{MODULES[name]}:{line}: {module} is in no layer"
            if RANK[UNITS[target]] > RANK[layer]:
                upward.append(f"{MODULES[name].relative_to(ROOT)}:{line} ({layer}) imports {module} ({UNITS[target]})")
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (found := visit(successor)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_two_packages_import_each_other():
    graph: dict[str, set[str]] = {}
    for name, imports in EDGES.items():
        for _, module in imports:
            source, target = _unit(name), _unit(module)
            if source != target:
                graph.setdefault(source, set()).add(target)
    cycle = _cycle(graph)
    assert cycle is None, "packages that import each other: " + " -> ".join(cycle)


def test_no_import_cycle_between_modules():
    graph = {name: {module for _, module in imports if module != name} for name, imports in EDGES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "modules that import each other: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
