"""The drafter checkpoint folder shared by every drafter kind.

A checkpoint is a folder with ``config.json`` and ``model.safetensors``. ``config.json`` holds a
``specheads`` block: the drafter kind, its hyper-parameters, and the verifier it was trained for
(name and fingerprint: vocabulary size, hidden size, a hash of the LM head). Loading checks the
fingerprint against the verifier in hand. Writes go to a temporary sibling folder that is renamed
into place, so a crash never leaves a half-written checkpoint that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import SpecHeadsError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def atomic_directory(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then move tmp_dir to ``target`` in one rename (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_drafter(
    path: str | os.PathLike,
    kind: str,
    state_dict: dict[str, torch.Tensor],
    hyper_parameters: dict,
    verifier_info: dict,
    extra_config: dict | None = None,
) -> Path:
    """Write a drafter checkpoint folder atomically.

    verifier_info: {"name", "vocab_size", "hidden_size", "lm_head_sha256"} (``Verifier.fingerprint()``
    plus the name). extra_config: top-level config keys for other consumers (e.g. vLLM's).
    """
    config = dict(extra_config or {})
    config["specheads"] = {
        "format_version": FORMAT_VERSION,
        "drafter_kind": kind,
        "hyper_parameters": hyper_parameters,
        "verifier": verifier_info,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if empty:  # e.g. parameters still partitioned by ZeRO-3: never write a checkpoint that cannot load
        raise SpecHeadsError(f"refusing to save drafter {path}: tensors {empty[:3]} are empty (sharded and not gathered?)")

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "specheads_kind": kind})
        with open(tmp / CONFIG, "w") as f:
            json.dump(config, f, indent=2)

    return atomic_directory(path, write)


def read_json_config(path: str | os.PathLike) -> dict:
    """A drafter folder's config.json as a dict: any drafter kind, or a plain model folder."""
    path = Path(path)
    if not path.is_dir():
        raise SpecHeadsError(f"drafter checkpoint not found: {path}")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise SpecHeadsError(f"drafter checkpoint {path} has no {CONFIG}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecHeadsError(f"drafter config {cfg_path} is corrupt: {exc}") from exc
    if not isinstance(config, dict):
        raise SpecHeadsError(f"drafter config {cfg_path} is corrupt: not a JSON object")
    return config


def read_config(path: str | os.PathLike) -> dict:
    """The config of a specheads drafter checkpoint (it has the ``specheads`` block)."""
    config = read_json_config(path)
    if "specheads" not in config or "drafter_kind" not in config["specheads"]:
        raise SpecHeadsError(f"{Path(path) / CONFIG} is not a specheads drafter config (no 'specheads.drafter_kind')")
    return config


def load_drafter_state(path: str | os.PathLike, verifier=None, expected_kind: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a checkpoint, after checking it was trained for ``verifier``."""
    path = Path(path)
    config = read_config(path)
    meta = config["specheads"]
    if expected_kind and meta["drafter_kind"] != expected_kind:
        raise SpecHeadsError(f"{path} holds a '{meta['drafter_kind']}' drafter, not '{expected_kind}'")
    if verifier is not None:
        check_verifier(meta.get("verifier", {}), verifier, path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise SpecHeadsError(f"drafter checkpoint {path} has no {WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise SpecHeadsError(f"drafter weights {weights} are corrupt or truncated: {exc}") from exc
    return config, tensors


def check_verifier(recorded: dict, verifier, path) -> None:
    """Fail clearly when a drafter meets a verifier it was not trained for."""
    actual = verifier.fingerprint()
    for key in ("vocab_size", "hidden_size"):
        if key in recorded and recorded[key] != actual[key]:
            raise SpecHeadsError(
                f"drafter {path} was trained for a verifier with {key}={recorded[key]} "
                f"({recorded.get('name', '?')}), but '{verifier.name}' has {key}={actual[key]}"
            )
    if "lm_head_sha256" in recorded and recorded["lm_head_sha256"] != actual["lm_head_sha256"]:
        raise SpecHeadsError(
            f"drafter {path} was trained for verifier '{recorded.get('name', '?')}' (LM head hash "
            f"{recorded['lm_head_sha256']}), but '{verifier.name}' has LM head hash {actual['lm_head_sha256']}: "
            "a different model (or different weights)"
        )


def verifier_info(verifier) -> dict:
    return {"name": verifier.name, **verifier.fingerprint()}
