"""A training run's checkpoints: written whole or not at all, the newest whole one found, and
resumed only under a recipe that means the same.

``<output_dir>/checkpoints/step-N`` holds accelerate's ``save_state`` (model, optimizer, scheduler,
RNG of every process), a loadable drafter, and ``trainer_state.json`` (step, history, the
recipe values the checkpoint depends on, every file's size), written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict

from ..atomic_files import fsync_path, fsync_tree
from ..errors import SpecHeadsError
from .recipe import Recipe

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
# What --resume --force may change: where training stops and what it reports, never what a step
# computes from the data (max_steps does re-stretch the cosine schedule from the resumed step on).
SAFE_TO_CHANGE = ("training.max_steps", "training.eval_every", "training.save_every", "training.log_every")
# Not recorded at all: where files go, and the hidden-state cache and the verifier's sharding, which change no value.
_NOT_RECORDED = ("training.output_dir", "training.cache_hidden_states", "training.hidden_cache_dir", "verifier.trust_remote_code",
                 "verifier.shard")


def save_checkpoint(accelerator, objective, module, output_dir: str, step: int, trainer_state: dict) -> None:
    """Training state and a loadable drafter for this step, published only once whole and on disk.

    Everything is written into ``.step-N.tmp``, fsynced, then renamed to ``step-N`` (and the parent
    fsynced): a kill at any instant leaves the earlier checkpoints untouched and either no
    ``step-N`` or a whole one. trainer_state.json, written last, lists every file's size, which
    ``latest_checkpoint`` checks before trusting a checkpoint.
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp")
    old = os.path.join(root, f".step-{step}.old")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for entry in os.listdir(root):  # leftovers of a run killed mid-save: never read, so removed
            if re.fullmatch(r"\.step-\d+\.(tmp|old)", entry):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its RNG state into tmp before it is published
    state = accelerator.get_state_dict(module)  # collective: gathers ZeRO-3 / FSDP shards on the main process
    if accelerator.is_main_process:
        objective.save(state, os.path.join(tmp, "drafter"))
        files = {}
        for folder, _, names in os.walk(tmp):
            for name in names:
                full = os.path.join(folder, name)
                files[os.path.relpath(full, tmp)] = os.path.getsize(full)
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump({**trainer_state, "step": step, "files": files}, f)
        fsync_tree(tmp)  # contents on disk before the rename makes them the checkpoint
        if os.path.lexists(final):  # a step saved again: the old copy is set aside (ignored) until the new one is in
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(output_dir: str, warn=print) -> tuple[str, int, dict] | None:
    """(path, step, trainer state) of the newest whole checkpoint; damaged ones are skipped, said."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"step-(\d+)", d))]
    for step, d in sorted(steps, reverse=True):
        path = os.path.join(root, d)
        state, problem = _read_trainer_state(path, step)
        if state is not None:
            return path, step, state
        warn(f"[specheads] --resume: skipping checkpoint {path}: {problem}")
    return None


def _read_trainer_state(path: str, step: int) -> tuple[dict | None, str | None]:
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None, f"incomplete (no {TRAINER_STATE})"
    except (OSError, ValueError) as exc:
        return None, f"unreadable {TRAINER_STATE} ({exc})"
    if not isinstance(state, dict) or state.get("step") != step:
        return None, f"{TRAINER_STATE} does not record step {step}"
    for rel, size in (state.get("files") or {}).items():
        full = os.path.join(path, rel)
        actual = os.path.getsize(full) if os.path.isfile(full) else None
        if actual != size:
            return None, f"{rel} is {'missing' if actual is None else f'{actual} bytes'}, {size} bytes were written"
    return state, None


def resume_fields(recipe: Recipe, train_examples: int) -> dict:
    """The recipe values a checkpoint's meaning depends on, as ``section.key``: the verifier, the
    data and its order (data settings, example count, batch size, accumulation, seed), the
    drafter's shapes, the objective, the optimizer and schedule, and the cadence. Every training
    setting is in unless listed in ``_NOT_RECORDED``, so a new one is checked by default."""
    fields = {k: v for k, v in _leaves(asdict(recipe)).items() if k not in _NOT_RECORDED}
    fields["data.train_examples"] = int(train_examples)
    return fields


def resume_record(fields: dict) -> dict:
    """What a checkpoint records of its recipe: ``resume_fields`` and their hash."""
    return {"hash": _fingerprint(fields), "values": fields}


def _fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _leaves(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as flat ``a.b.c`` keys, values made what JSON gives back (tuples as lists)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))
    return out


def _default_fields() -> dict:
    """Every recipe key at its default, optional sections included, for settings newer than a
    checkpoint: one it does not record is unchanged while at its default."""
    from .recipe import _SECTIONS

    def walk(cls, prefix):
        out = {}
        for f in dataclasses.fields(cls):
            sub = _SECTIONS.get((cls, f.name))
            if sub is not None:
                out.update(walk(sub, f"{prefix}{f.name}."))
            if sub is None or f.default is None:  # a leaf, or an optional section left out
                value = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                out[f"{prefix}{f.name}"] = None if dataclasses.is_dataclass(value) else json.loads(json.dumps(value, default=str))
        return out

    return walk(Recipe, "")


_ABSENT = object()


def check_resume(path: str, saved: dict, fields: dict, force: bool) -> list[str]:
    """Refuse to resume ``saved`` under a recipe that changed what it depends on; returns the
    accepted (--force, safe) changes as "key: old → new"."""
    record = saved.get("resume") if isinstance(saved.get("resume"), dict) else {}
    old = record.get("values")
    if not isinstance(old, dict):
        raise SpecHeadsError(f"--resume: checkpoint {path} records no recipe fingerprint (written before specheads checked "
                             "resumes), so whether this recipe matches it cannot be told; train into a fresh training.output_dir")
    if record.get("hash") == _fingerprint(fields):
        return []
    defaults = _default_fields()
    changed = []
    for key in sorted(set(old) | set(fields)):
        was, now = old.get(key, _ABSENT), fields.get(key, _ABSENT)
        if was == now or (was is _ABSENT and key in defaults and now == defaults[key]):
            continue
        changed.append(key)

    def show(v):
        return "(not set)" if v is _ABSENT else json.dumps(v)

    diff = [f"{k}: {show(old.get(k, _ABSENT))} → {show(fields.get(k, _ABSENT))}" for k in changed]
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
    if unsafe:
        raise SpecHeadsError(
            f"--resume: the recipe differs from the one that wrote {path}: {'; '.join(diff)}. "
            f"{', '.join(unsafe)} change{'s' if len(unsafe) == 1 else ''} what the checkpoint means (data order, shapes, "
            "loss or schedule), so it cannot be continued" + (", not even with --force" if force else "")
            + ": restore the old values or train into a fresh training.output_dir "
            f"(--force accepts changes to {', '.join(SAFE_TO_CHANGE)} only)")
    if changed and not force:
        raise SpecHeadsError(f"--resume: the recipe differs from the one that wrote {path}: {'; '.join(diff)}. "
                             "Rerun with --resume --force to accept this change")
    return diff
