"""Measurements that depend on the machine (CPU-linears choice, verifier cost per token count),
kept in a small JSON file per kind under the specheads cache, keyed by what they depend on."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable


def measured_once(store: str | os.PathLike, key: str, measure: Callable[[], Any], *, refresh: bool = False) -> tuple[Any, bool]:
    """(the value stored under ``key``, True), or ``measure()`` stored there now, and False."""
    store = Path(store)
    try:
        known = json.loads(store.read_text()) if store.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}  # an unreadable store only costs a new measurement
    if not refresh and key in known:
        return known[key], True
    value = measure()
    known[key] = value
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, store)  # readers never see half a file
    return value, False
