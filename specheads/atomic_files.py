"""Files and folders written so that a crash never leaves a half-written one in place.

``atomic_directory`` builds a folder beside its target and renames it in; ``write_json_atomic``
does the same for one JSON file. Both flush the contents to disk before the rename, so after a
power loss the target is the previous version or the whole new one. This module imports nothing
of specheads: everything that writes may use it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

# write_json_atomic's temporary files start with this, so the owner of a folder can tell a killed
# writer's leftovers from real entries (training/data.py removes them).
TMP_PREFIX = ".tmp-"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's contents, or a folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write ``data`` as indented JSON: to a temporary file in the same folder, flushed, then renamed
    over ``path``. Readers see the old file or the whole new one, never a part."""
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"  # before any file exists: a bad value leaves nothing
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


# Names of the sibling folders atomic_directory goes through: ".NAME.tmp-PID-RANDOM" (being
# written) and ".NAME.old-PID-RANDOM" (the previous folder, moved aside for the instant between the
# two renames). The PID says whether the writer still runs; the random part keeps a reused PID from
# colliding with a stale folder. Older versions wrote ".NAME.tmp-RANDOM" and ".NAME.old-PID".
_SIBLING = r"\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-[A-Za-z0-9_]+|(?P<legacy_pid>\d+)|[A-Za-z0-9_]+)"
_IN_PROGRESS: set[str] = set()  # this process's own sibling folders, still in use


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask is process-wide and racy)
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_tree(root: Path) -> None:
    """Give every file and folder under root ordinary permissions (what open() and mkdir() give
    under the umask: safetensors writes its files 0o600, mkdtemp its folder 0o700), then flush
    them, so a folder renamed into place after a power loss never holds empty or partial files."""
    umask = _umask()
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            os.chmod(path, (0o666 | (path.stat().st_mode & 0o111)) & ~umask)
            fsync_path(path)
        os.chmod(folder, 0o777 & ~umask)
        fsync_path(folder)


def _writer_alive(pid: int | None, path: Path) -> bool:
    if pid is None or pid <= 0:
        return False  # an older version's temp folder, or a name we did not write: no owner to wait for
    if pid == os.getpid():
        return str(path) in _IN_PROGRESS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a live process of another user
        return True
    return True


def recover_directory(target: str | os.PathLike) -> None:
    """Finish what an interrupted ``atomic_directory`` left next to ``target``.

    A writer killed between its two renames leaves no ``target`` but the previous folder as
    ``.NAME.old-*``: it is moved back. Other leftovers of dead writers (``.tmp-*`` folders, an
    ``.old-*`` whose replacement landed) are removed. Folders of writers still running are left alone.
    """
    target = Path(target)
    parent = target.parent
    pattern = re.compile(re.escape(f".{target.name}") + _SIBLING + "$")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return  # no parent folder: nothing to recover
    stale = {"tmp": [], "old": []}
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        path = parent / entry.name
        pid = match["pid"] or match["legacy_pid"]
        pid = int(pid) if pid else None
        if not _writer_alive(pid, path):
            stale[match["kind"]].append(path)
    if stale["old"] and not os.path.lexists(target):
        # Only the previous folder is known complete: a .tmp may have died mid-write.
        newest = max(stale["old"], key=lambda p: p.stat().st_mtime)
        os.replace(newest, target)
        stale["old"].remove(newest)
        fsync_path(parent)
    for path in stale["tmp"] + stale["old"]:
        shutil.rmtree(path, ignore_errors=True)


def atomic_directory(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then move tmp_dir to ``target`` (replacing it), so that at every
    instant either the previous folder or the complete new one is in place or recoverable.

    The previous folder is renamed aside, the new one renamed in, the parent fsynced, and only then
    the previous one deleted; a crash in between leaves it as ``.NAME.old-*``, which the next
    save or load (``recover_directory``) moves back. Files are fsynced before the renames. Folders
    get 0o777 and files 0o666 minus the umask (not mkdtemp's 0o700 or safetensors' 0o600), so
    other users, such as a serving process, can read the checkpoint.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent))
    old = parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    _IN_PROGRESS.update((str(tmp), str(old)))
    try:
        write(tmp)
        _finish_tree(tmp)
        moved_aside = False
        if os.path.lexists(target):
            os.replace(target, old)
            moved_aside = True
        try:
            os.replace(tmp, target)
        except BaseException:
            if moved_aside and not os.path.lexists(target):
                os.replace(old, target)  # put the previous folder back before reporting the failure
            raise
        fsync_path(parent)
        if moved_aside:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _IN_PROGRESS.difference_update((str(tmp), str(old)))
        shutil.rmtree(tmp, ignore_errors=True)
    return target
