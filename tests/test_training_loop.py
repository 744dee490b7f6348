"""The training loop's bookkeeping: gradient accumulation, resume checks, checkpoint integrity."""

import json
import os
import shutil

import pytest
import torch
from test_medusa_training import counting_data, recipe, tiny_verifier

from specheads.checkpoint import load_drafter_state
from specheads.errors import SpecHeadsError
from specheads.training import loop, resume
from specheads.training.loop import train


def weights(final):
    return load_drafter_state(final)[1]


def assert_same_weights(a, b, **tol):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **(tol or dict(atol=1e-6, rtol=1e-5)))


def history(out):
    return json.loads((out / "training_summary.json").read_text())["history"]


def test_accumulated_micro_batches_equal_one_larger_batch(tmp_path):
    """G=2 micro-batches of 4 make the same updates as G=1 batches of 8: same weights, same
    learning-rate curve, steps counted in optimizer steps. The examples have different lengths, so
    the loss must be normalised over the whole step's tokens, not per micro-batch."""
    v = tiny_verifier()
    data = (counting_data(32, 0), counting_data(8, 1))  # 4 optimizer steps per epoch either way
    common = ("training.max_steps=10", "training.warmup_steps=3", "training.log_every=1", "training.eval_every=5", "training.save_every=100")
    big = train(recipe(tmp_path / "big", *common, "training.batch_size=8"), verifier=v, datasets=data, progress=False)
    acc = train(recipe(tmp_path / "acc", *common, "training.batch_size=4", "training.gradient_accumulation_steps=2"),
                verifier=v, datasets=data, progress=False)
    assert_same_weights(big, acc, atol=1e-5, rtol=1e-4)
    h_big, h_acc = ([h for h in history(tmp_path / d) if "lr" in h] for d in ("big", "acc"))
    assert [h["step"] for h in h_acc] == list(range(1, 11))
    lr_big, lr_acc = [h["lr"] for h in h_big], [h["lr"] for h in h_acc]
    assert lr_acc == pytest.approx(lr_big, rel=1e-12)
    assert lr_acc[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule runs to its end
    assert [h["loss"] for h in h_acc] == pytest.approx([h["loss"] for h in h_big], rel=1e-4)
    assert [h["step"] for h in history(tmp_path / "acc") if "eval/top1_head0" in h] == [5, 10]


class Interrupted(Exception):
    pass


def interrupt_after_save(monkeypatch, at_step):
    real_save = loop.save_checkpoint

    def save_then_crash(accelerator, objective, module, output_dir, step, state):
        real_save(accelerator, objective, module, output_dir, step, state)
        if step == at_step:
            raise Interrupted

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    return real_save


def test_resume_with_accumulation_matches_uninterrupted_run(tmp_path, monkeypatch):
    v = tiny_verifier()
    data = (counting_data(40, 0), counting_data(8, 1))
    args = ("training.max_steps=7", "training.batch_size=4", "training.gradient_accumulation_steps=3",
            "training.save_every=2", "training.log_every=1", "training.eval_every=100")
    full = train(recipe(tmp_path / "full", *args), verifier=v, datasets=data, progress=False)
    real = interrupt_after_save(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train(recipe(tmp_path / "cut", *args), verifier=v, datasets=data, progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    resumed = train(recipe(tmp_path / "cut", *args), verifier=v, datasets=data, resume=True, progress=False)
    assert_same_weights(full, resumed)
    # the history saved with the checkpoint is read back: the summary is the uninterrupted run's
    cut, full = history(tmp_path / "cut"), history(tmp_path / "full")
    assert [h.keys() for h in cut] == [h.keys() for h in full] and len(cut) == 8  # 7 logs + the final eval
    for a, b in zip(cut, full):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 4-step run (all in warmup: training.warmup_steps=5) with checkpoints at steps 2 and 4 (the end)."""
    out = tmp_path_factory.mktemp("run")
    v = tiny_verifier()
    data = (counting_data(32, 0), counting_data(8, 1))
    train(recipe(out, "training.max_steps=4", "training.save_every=2", "training.log_every=1", "training.eval_every=100"),
          verifier=v, datasets=data, progress=False)
    return out, v, data


def resume_copy(checkpointed, tmp_path, *overrides, force=False):
    out, v, data = checkpointed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    base = ("training.max_steps=4", "training.save_every=2", "training.log_every=1", "training.eval_every=100")
    return train(recipe(copy, *base, *overrides), verifier=v, datasets=data, resume=True, force=force, progress=False), copy


@pytest.mark.parametrize("override, named", [
    ("training.batch_size=4", "training.batch_size: 8 → 4"),
    ("drafter.num_heads=2", "drafter.num_heads: 3 → 2"),
    ("training.seed=1", "training.seed: 0 → 1"),
    ("training.lr=0.001", "training.lr: 0.003 → 0.001"),
    ("training.gradient_accumulation_steps=2", "training.gradient_accumulation_steps: 1 → 2"),
    ("objective.loss=kl", 'objective.loss: "ce" → "kl"'),
    ("data.max_length=64", "data.max_length: 512 → 64"),
])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_resume_refuses_a_changed_recipe_even_with_force(checkpointed, tmp_path, override, named, force):
    with pytest.raises(SpecHeadsError) as exc:
        resume_copy(checkpointed, tmp_path, override, force=force)
    message = str(exc.value)
    assert named in message and "step-4" in message, message
    assert ("not even with --force" in message) == force


def test_resume_refuses_other_data(checkpointed, tmp_path):
    out, v, data = checkpointed
    shutil.copytree(out, tmp_path / "copy")
    with pytest.raises(SpecHeadsError, match="data.train_examples: 32 → 24"):
        train(recipe(tmp_path / "copy", "training.max_steps=4", "training.save_every=2", "training.log_every=1", "training.eval_every=100"),
              verifier=v, datasets=(counting_data(24, 0), data[1]), resume=True, progress=False)


def test_force_accepts_a_longer_run_and_keeps_the_history(checkpointed, tmp_path, capsys):
    """A finished run continues from its last step, not from its last save_every checkpoint; its
    steps were all in warmup (their learning rate does not depend on max_steps), so the weights
    are exactly those of an uninterrupted run to the larger max_steps."""
    out, v, data = checkpointed
    longer = ("training.max_steps=6", "training.eval_every=3")
    with pytest.raises(SpecHeadsError, match=r"training.eval_every: 100 → 3; training.max_steps: 4 → 6. Rerun with --resume --force"):
        resume_copy(checkpointed, tmp_path, *longer)
    shutil.rmtree(tmp_path / "copy")
    capsys.readouterr()
    final, copy = resume_copy(checkpointed, tmp_path, *longer, force=True)
    assert f"resumed from {copy / 'checkpoints' / 'step-4'} (step 4)" in capsys.readouterr().out
    steps = [h["step"] for h in history(copy) if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 come from the checkpoint's trainer state
    assert [h["step"] for h in history(copy) if "eval/top1_head0" in h] == [4, 6]  # 4: the first run's final evaluation
    uninterrupted = train(recipe(tmp_path / "six", "training.max_steps=6", "training.save_every=2", "training.log_every=1", "training.eval_every=3"),
                          verifier=v, datasets=data, progress=False)
    assert_same_weights(final, uninterrupted)


def test_force_needs_resume_and_a_finished_checkpoint_is_refused(checkpointed, tmp_path):
    out, v, data = checkpointed
    with pytest.raises(SpecHeadsError, match="--force only applies with --resume"):
        train(recipe(tmp_path, "training.max_steps=2"), verifier=v, datasets=data, force=True, progress=False)
    with pytest.raises(SpecHeadsError, match="at step 4, not before training.max_steps=2: nothing left to train$"):
        resume_copy(checkpointed, tmp_path, "training.max_steps=2", force=True)
    shutil.rmtree(tmp_path / "copy")
    with pytest.raises(SpecHeadsError, match=r"at step 4, not before training.max_steps=4: nothing left to train \(the run is finished"):
        resume_copy(checkpointed, tmp_path)


def test_a_checkpoint_without_fingerprint_is_refused(checkpointed, tmp_path):
    out, v, data = checkpointed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state_path = copy / "checkpoints" / "step-4" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["resume"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(SpecHeadsError, match="records no recipe fingerprint"):
        train(recipe(copy, "training.max_steps=4", "training.save_every=2", "training.log_every=1", "training.eval_every=100"),
              verifier=v, datasets=data, resume=True, progress=False)


def test_a_setting_newer_than_the_checkpoint_at_its_default_is_no_change(checkpointed):
    out, _, _ = checkpointed
    path, step, saved = resume.latest_checkpoint(str(out))
    fields = dict(saved["resume"]["values"])
    assert "training.batch_size" in fields and "training.output_dir" not in fields
    older = {**saved, "resume": {"hash": "older", "values": {k: v for k, v in fields.items() if k != "data.num_conversations"}}}
    if "data.num_conversations" in fields:
        assert resume.check_resume(path, older, fields, force=False) == []
    with pytest.raises(SpecHeadsError, match=r"training.log_every: \(not set\) → 1"):
        resume.check_resume(path, {**saved, "resume": {"hash": "x", "values": {k: v for k, v in fields.items() if k != "training.log_every"}}},
                           fields, force=False)


def test_damaged_checkpoints_are_skipped(tmp_path):
    """The newest checkpoint whose files are all there, at the sizes written, is the one resumed."""
    v = tiny_verifier()
    data = (counting_data(32, 0), counting_data(8, 1))
    out = tmp_path / "run"
    train(recipe(out, "training.max_steps=4", "training.save_every=1", "training.eval_every=100"), verifier=v, datasets=data, progress=False)
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-1", "step-2", "step-3", "step-4"]
    warnings = []
    assert resume.latest_checkpoint(str(out), warn=warnings.append)[1] == 4 and not warnings
    weights_file = root / "step-4" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-7])  # cut short
    (root / "step-3" / "trainer_state.json").write_text('{"step": 3, "hist')  # cut short
    os.makedirs(root / "step-9")  # a folder never published by save_checkpoint
    os.makedirs(root / ".step-5.tmp")  # a save killed before its rename
    path, step, _ = resume.latest_checkpoint(str(out), warn=warnings.append)
    assert step == 2, warnings
    assert len(warnings) == 3
    assert "model.safetensors is" in warnings[1] and "unreadable trainer_state.json" in warnings[2], warnings


def test_a_run_killed_after_its_last_checkpoint_writes_its_drafter_on_resume(checkpointed, tmp_path, monkeypatch):
    """The last checkpoint comes before the drafter: a run killed in between is resumed at its last
    step, trains nothing, and writes the drafter and summary the uninterrupted run did."""
    out, v, data = checkpointed
    args = ("training.max_steps=4", "training.save_every=2", "training.log_every=1", "training.eval_every=100")
    real = interrupt_after_save(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train(recipe(tmp_path / "cut", *args), verifier=v, datasets=data, progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert not (tmp_path / "cut" / "drafter").exists()
    resumed = train(recipe(tmp_path / "cut", *args), verifier=v, datasets=data, resume=True, progress=False)
    assert_same_weights(out / "drafter", resumed, atol=0, rtol=0)
    assert history(tmp_path / "cut") == history(out)
    with pytest.raises(SpecHeadsError, match="nothing left to train"):
        train(recipe(tmp_path / "cut", *args), verifier=v, datasets=data, resume=True, progress=False)


def test_a_longer_run_follows_its_own_schedule_from_the_resumed_step(tmp_path):
    """--resume --force training.max_steps=6 on a finished 4-step cosine run: the steps after the
    resume use the 6-step schedule's learning rates, the first one included (the restored
    optimizer holds the 4-step schedule's last rate, 0)."""
    v = tiny_verifier()
    data = (counting_data(32, 0), counting_data(8, 1))
    args = ("training.warmup_steps=2", "training.save_every=100", "training.eval_every=100")
    rates = []

    def record(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.AdamW):
            rates.append(optimizer.param_groups[0]["lr"])

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(record)
    try:
        train(recipe(tmp_path / "six", *args, "training.max_steps=6"), verifier=v, datasets=data, progress=False)
        six, rates[:] = list(rates), []
        train(recipe(tmp_path / "run", *args, "training.max_steps=4"), verifier=v, datasets=data, progress=False)
        four, rates[:] = list(rates), []
        train(recipe(tmp_path / "run", *args, "training.max_steps=6"), verifier=v, datasets=data, resume=True, force=True, progress=False)
    finally:
        hook.remove()
    assert len(six) == 6 and len(four) == 4 and four[3] != six[3]  # the two schedules part after the warmup
    assert rates == pytest.approx(six[4:], rel=1e-12) and rates[0] > 0


def test_cli_train_passes_resume_and_force(tmp_path, monkeypatch):
    from specheads import cli

    seen = {}
    monkeypatch.setattr(loop, "train", lambda recipe, **kwargs: seen.update(kwargs))
    (tmp_path / "r.yaml").write_text("data: {conversations: nowhere.jsonl}\n")
    assert cli.main(["train", "--recipe", str(tmp_path / "r.yaml"), "--resume", "--force"]) == 0
    assert seen["resume"] is True and seen["force"] is True
    assert cli.main(["train", "--recipe", str(tmp_path / "r.yaml")]) == 0
    assert seen["resume"] is False and seen["force"] is False


def test_epoch_order_groups_lengths_and_stays_a_random_permutation():
    """With lengths, batches of consecutive examples pad far less than in a plain random order; the
    order is still a permutation, fixed by (seed, epoch), and changes from epoch to epoch."""
    import random

    lengths = [random.Random(i).randint(10, 600) for i in range(1000)]
    grouped = loop.epoch_order(1000, 0, 0, lengths)
    plain = loop.epoch_order(1000, 0, 0)
    assert sorted(grouped) == list(range(1000)) and grouped == loop.epoch_order(1000, 0, 0, lengths)
    assert grouped != loop.epoch_order(1000, 0, 1, lengths)

    def padding(order, b=16):
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        return sum(max(lengths[i] for i in bt) * len(bt) - sum(lengths[i] for i in bt) for bt in batches)

    assert padding(grouped) < 0.25 * padding(plain)
    # small runs keep the order random: the first examples are not simply the shortest
    assert sorted(lengths)[len(lengths) // 4] < sum(lengths[i] for i in grouped[:64]) / 64
