"""The one atomic JSON writer: whole files only, flushed before the rename, no temporary left behind;
and specheads' modules import each other without a cycle (function-level imports included)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from specheads import atomic_files
from specheads.atomic_files import TMP_PREFIX, write_json_atomic


def test_write_replaces_the_whole_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"steps": 1})
    write_json_atomic(path, {"steps": 2, "name": "naïve"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"steps": 2, "name": "naïve"}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"count": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"count": object()})  # not JSON: fails before any file is touched

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(path, {"count": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"count": 1}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_the_contents_are_flushed_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    monkeypatch.setattr(atomic_files.os, "replace", replace)
    write_json_atomic(tmp_path / "a.json", [1, 2])
    monkeypatch.undo()
    (_, tmp), (kind, moved), last = events[0], events[1], events[-1]
    assert tmp.startswith(f"{TMP_PREFIX}a.json.") and (kind, moved) == ("replace", tmp)
    assert last == ("fsync", tmp_path.name)  # the folder, so the rename itself survives a power loss


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
    graph = _import_graph(Path(atomic_files.__file__).parent)
    assert "specheads.verifier" in graph["specheads.checkpoint"]  # the graph sees these imports at all

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
