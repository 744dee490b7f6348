"""Checkpoint folders: atomic writes that survive a crash at any point, permissions, fsync, and the
verifier check (refusing drafters that record no verifier, telling a Medusa-2 verifier from its base)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat

import pytest
import torch

from conftest import cached_verifier, make_verifier
from specheads import atomic_files
from specheads.checkpoint import atomic_directory, check_verifier, load_drafter_state, recover_directory, verifier_info
from specheads.drafters import build_drafter
from specheads.drafters.medusa import MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa
from specheads.errors import SpecHeadsError
from specheads.verifier import Verifier, weights_sha256


def write_version(n: int):
    def write(tmp):
        (tmp / "version.txt").write_text(str(n))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "data.bin").write_bytes(bytes([n]) * 16)

    return write


def version(target) -> int:
    return int((target / "version.txt").read_text())


def leftovers(target) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


class Crash(BaseException):
    """The process dying: raised at one step and at every later one, so nothing after it runs."""


def crash_at(monkeypatch, step: int) -> None:
    """Kill atomic_directory at its ``step``-th filesystem step (1-based; 0 = inside write()):
    os.replace and shutil.rmtree, the calls that move or delete folders."""
    calls = {"n": 0}

    def wrap(real):
        def fake(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= step:
                raise Crash(f"killed at step {calls['n']}")
            return real(*args, **kwargs)

        return fake

    monkeypatch.setattr(atomic_files.os, "replace", wrap(os.replace))
    monkeypatch.setattr(atomic_files.shutil, "rmtree", wrap(shutil.rmtree))


# Steps of a save over an existing folder: 1 previous -> .old, 2 new -> target, 3 delete .old,
# 4 delete the (already moved) tmp. Until step 2 has run the previous folder is the one to keep.
@pytest.mark.parametrize("step, survivor", [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)])
def test_a_crash_at_any_step_keeps_the_previous_folder(tmp_path, monkeypatch, step, survivor):
    target = tmp_path / "drafter"
    atomic_directory(target, write_version(1))
    crash_at(monkeypatch, max(step, 1))
    write = write_version(2)
    if step == 0:
        def write(tmp):  # noqa: F811  dies half-way through writing
            (tmp / "version.txt").write_text("2")
            raise Crash("killed in write")
    with pytest.raises(Crash):
        atomic_directory(target, write)
    monkeypatch.undo()
    recover_directory(target)  # what the next save or load does first
    assert version(target) == survivor
    assert leftovers(target) == []
    atomic_directory(target, write_version(3))
    assert version(target) == 3 and leftovers(target) == []


@pytest.mark.parametrize("call", [1, 2])
def test_a_failed_rename_leaves_the_previous_folder_in_place(tmp_path, monkeypatch, call):
    """An error (not a crash) in either rename: the previous folder is back before it is reported."""
    target = tmp_path / "drafter"
    atomic_directory(target, write_version(1))
    real, calls = os.replace, {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == call:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        atomic_directory(target, write_version(2))
    monkeypatch.undo()
    assert version(target) == 1 and leftovers(target) == []


def test_loading_recovers_a_drafter_left_aside_by_a_crash(tmp_path, monkeypatch):
    verifier = cached_verifier("llama", 0)
    path = tmp_path / "heads"
    heads = MedusaHeads(MedusaConfig(hidden_size=verifier.hidden_size, vocab_size=verifier.vocab_size, num_heads=2))
    save_medusa(path, heads, verifier)
    crash_at(monkeypatch, 2)  # killed between the two renames: no folder at `path`
    with pytest.raises(Crash):
        save_medusa(path, MedusaHeads(MedusaConfig(hidden_size=verifier.hidden_size, vocab_size=verifier.vocab_size, num_heads=3)), verifier)
    monkeypatch.undo()
    assert not path.exists()
    assert load_medusa_heads(path, verifier).config.num_heads == 2
    assert leftovers(path) == []


def test_build_drafter_recovers_too(tmp_path, monkeypatch):
    verifier = cached_verifier("llama", 0)
    path = tmp_path / "heads"
    save_medusa(path, MedusaHeads(MedusaConfig(hidden_size=verifier.hidden_size, vocab_size=verifier.vocab_size, num_heads=2)), verifier)
    crash_at(monkeypatch, 2)
    with pytest.raises(Crash):
        atomic_directory(path, write_version(2))
    monkeypatch.undo()
    assert build_drafter(str(path), verifier, tree="chain").heads.config.num_heads == 2


def test_a_stale_old_folder_with_a_reused_pid_does_not_block_a_save(tmp_path):
    """What an earlier version left when killed (``.NAME.old-PID``), the PID now ours again."""
    target = tmp_path / "drafter"
    atomic_directory(target, write_version(1))
    stale = tmp_path / f".drafter.old-{os.getpid()}"
    stale.mkdir()
    (stale / "version.txt").write_text("0")
    atomic_directory(target, write_version(2))
    assert version(target) == 2 and leftovers(target) == []


def test_a_stale_old_folder_is_restored_when_the_target_is_missing(tmp_path):
    stale = tmp_path / f".drafter.old-{os.getpid()}"  # an earlier version killed between its renames
    stale.mkdir()
    (stale / "version.txt").write_text("1")
    recover_directory(tmp_path / "drafter")
    assert version(tmp_path / "drafter") == 1 and leftovers(tmp_path / "drafter") == []


def test_folders_of_a_live_writer_are_left_alone(tmp_path):
    target = tmp_path / "drafter"
    atomic_directory(target, write_version(1))
    busy = tmp_path / ".drafter.tmp-1-abcdef12"  # PID 1 runs as long as the machine does
    busy.mkdir()
    atomic_directory(target, write_version(2))
    assert version(target) == 2 and busy.is_dir()


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_permissions_follow_the_umask(tmp_path, umask, folder, file):
    """Not mkdtemp's 0o700: a serving process of another user reads a drafter like a save_pretrained folder."""
    verifier = cached_verifier("llama", 0)
    old = os.umask(umask)
    try:
        save_medusa(tmp_path / "heads", MedusaHeads(MedusaConfig(hidden_size=verifier.hidden_size, vocab_size=verifier.vocab_size)), verifier)
        atomic_directory(tmp_path / "tree", write_version(1))
    finally:
        os.umask(old)
    for path in (tmp_path / "heads", tmp_path / "tree", tmp_path / "tree" / "sub"):
        assert stat.S_IMODE(path.stat().st_mode) == folder, path
    for path in (tmp_path / "heads" / "config.json", tmp_path / "heads" / "model.safetensors", tmp_path / "tree" / "sub" / "data.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == file, path


def test_files_and_the_parent_folder_are_fsynced(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(atomic_files.os, "fsync", record)
    atomic_directory(tmp_path / "drafter", write_version(1))
    monkeypatch.undo()
    names = {os.path.relpath(p, tmp_path) for p in synced}
    assert {n.split(os.sep, 1)[-1] for n in names if n.startswith(".drafter.tmp-")} >= {"version.txt", "sub", "sub/data.bin"}
    assert "." in names  # the parent, after the renames
    assert synced.index(str(tmp_path)) == len(synced) - 1


# -- the verifier check ------------------------------------------------------------------------
def save_heads(path, verifier, **changes):
    heads = MedusaHeads(MedusaConfig(hidden_size=verifier.hidden_size, vocab_size=verifier.vocab_size, num_heads=2))
    save_medusa(path, heads, verifier)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config["specheads"]["verifier"].pop(key, None)
        else:
            config["specheads"][key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_drafter_without_a_verifier_block_is_refused(tmp_path):
    verifier = cached_verifier("llama", 0)
    path = save_heads(tmp_path / "heads", verifier)
    config = json.loads((path / "config.json").read_text())
    del config["specheads"]["verifier"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecHeadsError, match="records no verifier.*'specheads.verifier'"):
        load_medusa_heads(path, verifier)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "lm_head_sha256"])
def test_a_verifier_block_without_its_keys_is_refused(tmp_path, key):
    verifier = cached_verifier("llama", 0)
    path = save_heads(tmp_path / "heads", verifier, **{key: None})
    with pytest.raises(SpecHeadsError) as exc:
        load_medusa_heads(path, verifier)
    assert f"without '{key}'" in str(exc.value)


def test_an_old_checkpoint_with_only_the_lm_head_hash_still_loads(tmp_path):
    verifier = cached_verifier("llama", 0)
    path = save_heads(tmp_path / "heads", verifier, weights_sha256=None)
    recorded = json.loads((path / "config.json").read_text())["specheads"]["verifier"]
    assert sorted(recorded) == ["hidden_size", "lm_head_sha256", "name", "vocab_size"]
    assert load_medusa_heads(path, verifier).config.num_heads == 2
    with pytest.raises(SpecHeadsError, match="LM head hash"):  # what it records is still checked
        load_medusa_heads(path, cached_verifier("llama", 1))


def adapted(verifier: Verifier) -> Verifier:
    """The verifier after a Medusa-2 run: LoRA on the attention, merged; the LM head untouched."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(copy.deepcopy(verifier.model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return Verifier(model=model.merge_and_unload().eval(), tokenizer=None, name="tiny-llama-medusa2")


def test_medusa2_heads_are_refused_for_the_base_verifier(tmp_path):
    base = cached_verifier("llama", 0)
    tuned = adapted(base)
    assert tuned.fingerprint() == base.fingerprint()  # the LM-head hash alone cannot tell them apart
    assert verifier_info(tuned)["weights_sha256"] != verifier_info(base)["weights_sha256"]
    path = save_heads(tmp_path / "heads", tuned)
    assert load_medusa_heads(path, tuned).config.num_heads == 2
    with pytest.raises(SpecHeadsError) as exc:
        load_medusa_heads(path, base)
    assert verifier_info(tuned)["weights_sha256"] in str(exc.value) and "Medusa-2" in str(exc.value)


def test_any_tuned_layer_changes_the_weights_hash():
    base = make_verifier("qwen2")
    before = weights_sha256(base.model)
    with torch.no_grad():
        base.model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert weights_sha256(base.model) != before


def test_the_weights_hash_is_the_same_for_float32_and_bfloat16_loads():
    model = make_verifier("llama").model
    rounded = copy.deepcopy(model).to(torch.bfloat16)
    assert weights_sha256(rounded) == weights_sha256(rounded.float())
    check_verifier(verifier_info(Verifier(rounded, None, "bf16")), Verifier(rounded.float(), None, "f32"), "x")


def test_draft_model_checkpoint_without_verifier_keys_is_refused(tmp_path):
    """A distilled draft model (kind draft_model) is checked the same way."""
    verifier = cached_verifier("llama", 0)
    verifier.model.save_pretrained(tmp_path / "student", safe_serialization=True)
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    config["specheads"] = {"format_version": 1, "drafter_kind": "draft_model", "verifier": {"name": "tiny"}}
    (tmp_path / "student" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecHeadsError, match="without 'vocab_size', 'hidden_size', 'lm_head_sha256'"):
        build_drafter(str(tmp_path / "student"), verifier)


def test_load_drafter_state_checks_what_the_checkpoint_records(tmp_path):
    verifier = cached_verifier("gpt2", 0)
    path = save_heads(tmp_path / "heads", verifier)
    config, tensors = load_drafter_state(path, verifier, expected_kind="medusa")
    assert config["specheads"]["verifier"]["weights_sha256"] == weights_sha256(verifier.model)
    assert tensors
