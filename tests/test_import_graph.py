"""voxblock's modules import one another without a cycle, function-level imports included.

A cycle makes the order of imports matter and hides who depends on whom: each edge here
is an `import voxblock.X` or `from voxblock[.X] import ...` anywhere in a module (at top
level or inside a function), except under `if TYPE_CHECKING:`, which never runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import voxblock

PACKAGE = Path(voxblock.__file__).parent


def module_names() -> dict[str, Path]:
    """Every module of the voxblock package by dotted name (a package by its __init__)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, outside `if TYPE_CHECKING:` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def imported(module: str, path: Path, modules: set[str]) -> set[str]:
    """The voxblock modules `module` imports."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            # `from voxblock import arrays` imports a module; `from voxblock import X` a name
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else base)
    return {t for t in targets if t in modules and t != module}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {module: imported(module, path, set(names)) for module, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_level_imports_and_skips_type_checking(tmp_path):
    source = (
        "from typing import TYPE_CHECKING\nfrom voxblock.errors import VoxblockError\n"
        "if TYPE_CHECKING:\n    from voxblock import arrays\n"
        "def f():\n    import voxblock.halo\n    from voxblock import chunks, VoxblockError\n"
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    modules = {"voxblock", "voxblock.errors", "voxblock.arrays", "voxblock.halo", "voxblock.chunks"}
    assert imported("voxblock.m", path, modules) == {
        "voxblock",
        "voxblock.errors",
        "voxblock.halo",
        "voxblock.chunks",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_voxblock_modules():
    graph = import_graph()
    assert {"voxblock.compute", "voxblock.halo", "voxblock.workers"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_worker_loop_loads_no_array_library_until_a_worker_needs_one():
    """A worker process pays for numpy and zarr only when its worker reads arrays: the no-op
    benchmark row starts its workers as fast as bare daisy does. What the fork server imports
    for every worker (forkserver.CORE_MODULES) loads none either."""
    code = (
        "import sys, voxblock.compute, voxblock.workers, voxblock.rundir, voxblock.forkserver\n"
        "from voxblock.forkserver import CORE_MODULES\n"
        "import importlib\n"
        "for name in CORE_MODULES: importlib.import_module(name)\n"
        "print(sorted(m for m in ('numpy', 'zarr', 'funlib.persistence') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
