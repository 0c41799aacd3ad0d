"""The package's import graph has no cycle: every module of ``bundle/`` can be read (and imported) on its own.

Imports are read with ``ast`` from the source, not by importing: module-level imports and the ones inside
functions alike. A function-level import only postpones a cycle to the first call (and hides it from the
reader), so it counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "bundle"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The ``bundle`` modules ``path`` imports anywhere (``import bundle.x``, ``from bundle import x``, ...)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from bundle import x` imports the module bundle.x when there is one, else a name of bundle
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            # `import bundle.x.y` names its deepest existing module
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None`` (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_import_graph_reads_every_kind_of_import() -> None:
    graph = import_graph()
    assert "bundle.errors" in graph["bundle"] and "bundle.options" in graph["bundle"]  # from bundle import x
    assert "bundle.evaluation.files" in graph["bundle.evaluation.reports"]  # from bundle.evaluation.files import ...
    assert "bundle.evaluation.plots" in graph["bundle.evaluation.reports"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_bundle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in bundle/: " + " -> ".join(cycle or [])


#: The package's floors, bottom up: a module imports only from its own floor or the floors below
#: (docs/architecture.md). Training and inference share a floor; the import-cycle test keeps them apart.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("bundle", "bundle.atomic", "bundle.constants", "bundle.errors", "bundle.options", "bundle.paths"),
    ("bundle.data",),
    ("bundle.transforms",),
    ("bundle.networks",),
    ("bundle.plan",),
    ("bundle.evaluation",),
    ("bundle.training", "bundle.inference"),
    ("bundle.integrations", "bundle.__main__"),
)


def floor_of(module: str) -> int:
    """The floor of a module: that of the longest package prefix listed in :data:`FLOORS`."""
    best, floor = "", -1
    for level, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, floor = name, level
    return floor


def test_every_module_has_a_floor_and_imports_point_down() -> None:
    graph = import_graph()
    unplaced = sorted(m for m in graph if floor_of(m) < 0)
    assert not unplaced, f"modules on no floor of FLOORS: {unplaced}"
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if floor_of(target) > floor_of(module)
    )
    assert not upward, "imports pointing up a floor:\n" + "\n".join(upward)


def test_the_floor_rule_catches_an_upward_import() -> None:
    assert floor_of("bundle.data.layouts") == 1 and floor_of("bundle.integrations.cli") == 7
    assert floor_of("bundle.training.losses") == floor_of("bundle.inference.run") == 6
    assert floor_of("bundle.evaluation.metrics") < floor_of("bundle.training.handlers")
