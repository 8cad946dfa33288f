"""The house rules, read from the code (AST, nothing is imported or run):

- imports point one way: ``pruning <- agents <- tasks <- flows <- agentic_pruner``;
- ``pruning/`` and ``agents/`` never import Prefect (they are unit-testable alone);
- no import cycles between modules (function-level imports count; ``TYPE_CHECKING`` blocks do not);
- no module over ``MAX_MODULE_LINES`` and no function over ``MAX_FUNCTION_LINES`` unless its docstring
  says why in a line starting with ``Long:``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pruning", "agents", "tasks", "flows", "agentic_pruner")  # each may import only those before it
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of every import outside ``if TYPE_CHECKING:`` blocks."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                out.append((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        names = _imported_names(ast.parse(path.read_text()), mod, path.name == "__init__.py")
        deps = set()
        for name, _ in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


def test_imports_point_one_way():
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    bad = []
    for mod, path in MODULES.items():
        for name, line in _imported_names(ast.parse(path.read_text()), mod, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top in rank and rank[top] > rank[mod.split(".")[0]]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            if top == "prefect" and mod.split(".")[0] in ("pruning", "agents"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports Prefect")
    assert not bad, "imports against the layering pruning <- agents <- tasks <- flows <- agentic_pruner:\n" + \
        "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("pkg", LAYERS)
def test_module_and_function_sizes(pkg):
    too_long = []
    for mod, path in MODULES.items():
        if mod.split(".")[0] != pkg:
            continue
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: module of {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and "Long:" not in doc:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
