"""The one atomic JSON writer: whole files only, flushed before the rename, no temporary left behind."""

from __future__ import annotations

import json
import os

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
