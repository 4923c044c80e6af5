"""The package's import graph is a tree: no module imports, directly or through others,
a module that imports it back (imports inside functions count too; only imports under
``if TYPE_CHECKING:``, which never run, are left out)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mosaic_flwr"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (those under ``if TYPE_CHECKING:`` cannot)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: project modules it imports}``; importing ``a.b.c`` imports ``a.b`` and ``a``
    too, unless the importer lives inside them (then they are already being imported)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for candidate in candidates:
                parts = candidate.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    # A package the importer lives in is already being imported.
                    inside = name.startswith(target + ".")
                    if target in paths and target != name and not inside:
                        targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_relative_imports_and_parent_packages_are_edges():
    graph = import_graph()
    assert "mosaic_flwr.errors" in graph["mosaic_flwr.config"]
    assert "mosaic_flwr.mosaic.settings" in graph["mosaic_flwr.config"]
    assert "mosaic_flwr.mosaic" in graph["mosaic_flwr.config"]  # the parent package runs first


def test_no_module_of_the_package_is_part_of_an_import_cycle():
    assert find_cycle(import_graph()) == []


def test_leaf_modules_import_nothing_of_the_project():
    graph = import_graph()
    for leaf in ("mosaic_flwr.errors", "mosaic_flwr.registry"):
        assert graph[leaf] == set(), leaf


def test_the_command_line_and_the_package_load_without_torch_or_flower():
    code = ("import sys, mosaic_flwr, mosaic_flwr.cli; "
            "print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
