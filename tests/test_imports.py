"""specheads' modules import each other without a cycle, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import specheads


def _import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the specheads modules it imports anywhere in its text (top level or in a function)."""
    modules = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                deps |= {module} | {f"{module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_module_imports_itself_back():
    """A function-level import that only dodges a cycle is still a cycle (checkpoint <-> verifier was one)."""
    graph = _import_graph(Path(specheads.__file__).parent)
    assert "specheads.model_id" in graph["specheads.checkpoint"]  # the graph sees these imports at all

    def leads_back(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep == start:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return False

    assert [m for m in sorted(graph) if leads_back(m)] == []
