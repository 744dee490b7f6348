"""The drafter checkpoint folder shared by every drafter kind.

A checkpoint is a folder with ``config.json`` and ``model.safetensors``. ``config.json`` holds a
``specheads`` block: the drafter kind, its hyper-parameters, and the verifier it was trained for
(name and fingerprint: vocabulary size, hidden size, a hash of the LM head). Loading checks the
fingerprint against the verifier in hand. Writes go through ``atomic_files.atomic_directory`` (a
temporary sibling folder renamed into place), so a crash never leaves a half-written checkpoint that loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic_files import atomic_directory, recover_directory
from .errors import SpecHeadsError
from .model_id import weights_sha256

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


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
    recover_directory(path)  # a save killed between its renames leaves the previous folder aside
    if not path.is_dir():
        raise SpecHeadsError(f"drafter checkpoint not found: {path}")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise SpecHeadsError(f"drafter checkpoint {path} has no {CONFIG}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecHeadsError(f"drafter config {cfg_path} is corrupt: {exc}") from exc
    if not isinstance(config, dict):
        raise SpecHeadsError(f"drafter config {cfg_path} is corrupt: a JSON {type(config).__name__}, not an object")
    block = config.get("specheads")
    if block is not None and not isinstance(block, dict):
        raise SpecHeadsError(f"drafter config {cfg_path}: 'specheads' must be an object, got {block!r}")
    return config


def read_config(path: str | os.PathLike) -> dict:
    """The config of a specheads drafter checkpoint (it has the ``specheads`` block)."""
    config = read_json_config(path)
    block = config.get("specheads")
    if block is None or "drafter_kind" not in block:
        raise SpecHeadsError(f"{Path(path) / CONFIG} is not a specheads drafter config (no 'specheads.drafter_kind')")
    if not isinstance(block["drafter_kind"], str):
        raise SpecHeadsError(f"{Path(path) / CONFIG}: 'specheads.drafter_kind' must be a string, got {block['drafter_kind']!r}")
    return config


def load_drafter_state(path: str | os.PathLike, verifier=None, expected_kind: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a checkpoint, after checking it was trained for ``verifier``."""
    path = Path(path)
    config = read_config(path)
    meta = config["specheads"]
    if expected_kind and meta["drafter_kind"] != expected_kind:
        raise SpecHeadsError(f"{path} holds a '{meta['drafter_kind']}' drafter, not '{expected_kind}'")
    if verifier is not None:
        check_verifier(meta.get("verifier"), verifier, path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise SpecHeadsError(f"drafter checkpoint {path} has no {WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise SpecHeadsError(f"drafter weights {weights} are corrupt or truncated: {exc}") from exc
    return config, tensors


# What every checkpoint since format 1 records of its verifier; "weights_sha256" came later.
REQUIRED_VERIFIER_KEYS = ("vocab_size", "hidden_size", "lm_head_sha256")


def check_verifier(recorded: dict | None, verifier, path) -> None:
    """Fail clearly when a drafter meets a verifier it was not trained for.

    A drafter that records no verifier is refused rather than trusted: it would decode, only
    slowly and without a hint why. Checkpoints from before ``weights_sha256`` are checked on what
    they record (sizes and LM head), which cannot tell a Medusa-2 verifier from its base model.
    """
    if not recorded:
        raise SpecHeadsError(
            f"drafter {path} records no verifier (no 'specheads.verifier' in its {CONFIG}), so it cannot be checked "
            f"against '{verifier.name}': re-save it with specheads, or add the block (checkpoint.verifier_info(verifier))"
        )
    if not isinstance(recorded, dict):
        raise SpecHeadsError(f"drafter {path}: 'specheads.verifier' must be an object, got {recorded!r}")
    missing = [k for k in REQUIRED_VERIFIER_KEYS if k not in recorded]
    if missing:
        raise SpecHeadsError(
            f"drafter {path} records its verifier without {', '.join(repr(k) for k in missing)} (it has "
            f"{sorted(recorded) or 'no keys'}), so it cannot be checked against '{verifier.name}'"
        )
    actual = verifier.fingerprint()
    for key in ("vocab_size", "hidden_size"):
        if recorded[key] != actual[key]:
            raise SpecHeadsError(
                f"drafter {path} was trained for a verifier with {key}={recorded[key]} "
                f"({recorded.get('name', '?')}), but '{verifier.name}' has {key}={actual[key]}"
            )
    if recorded["lm_head_sha256"] != actual["lm_head_sha256"]:
        raise SpecHeadsError(
            f"drafter {path} was trained for verifier '{recorded.get('name', '?')}' (LM head hash "
            f"{recorded['lm_head_sha256']}), but '{verifier.name}' has LM head hash {actual['lm_head_sha256']}: "
            "a different model (or different weights)"
        )
    if "weights_sha256" in recorded:
        have = weights_sha256(verifier.model)
        if recorded["weights_sha256"] != have:
            raise SpecHeadsError(
                f"drafter {path} was trained for verifier '{recorded.get('name', '?')}' (weights hash "
                f"{recorded['weights_sha256']}), but '{verifier.name}' has weights hash {have}: same LM head, other "
                "weights, e.g. Medusa-2 heads (trained with a LoRA-tuned verifier: load the adapted verifier the run "
                "saved next to the drafter) or another fine-tune of the same base"
            )


def verifier_info(verifier) -> dict:
    """What a checkpoint records of its verifier: name, ``fingerprint()`` and a hash of every tensor."""
    return {"name": verifier.name, **verifier.fingerprint(), "weights_sha256": weights_sha256(verifier.model)}
