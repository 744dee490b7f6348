"""Medusa heads, their loss, checkpoints, and the training loop on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.checkpoint import load_drafter_state
from specheads.decoding.engine import SpeculativeDecoder
from specheads.drafters import build_drafter
from specheads.drafters.medusa import MedusaConfig, MedusaHeads, load_medusa_heads, save_medusa
from specheads.errors import SpecHeadsError
from specheads.training.loop import collate, train
from specheads.training.objectives import MedusaObjective
from specheads.training.recipe import DrafterSection, ObjectiveSection, load_recipe
from specheads.verifier import Verifier

V = 48


def tiny_verifier(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return Verifier(LlamaForCausalLM(cfg).eval().requires_grad_(False), None, f"tiny-{seed}")


def counting_data(n, seed):
    """Sequences that count upward mod V: the continuation is learnable from the current token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(2, V, (1,), generator=g))
        length = int(torch.randint(20, 40, (1,), generator=g))
        rows.append({"input_ids": [2 + (start + i) % (V - 2) for i in range(length)], "prompt_length": 4})
    return Dataset.from_list(rows)


def recipe(tmp_path, *overrides):
    return load_recipe(None, [
        f"training.output_dir={tmp_path}", "training.batch_size=8", "training.lr=0.003", "training.max_steps=60",
        "training.eval_every=30", "training.save_every=20", "training.log_every=10", "drafter.num_heads=3",
        "training.warmup_steps=5", "training.dtype=float32", *overrides,
    ])


def test_fresh_head_with_shared_lm_head_reproduces_verifier_logits():
    v = tiny_verifier()
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=V, num_heads=3, shared_lm_head=True))
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    out = v.model(ids, output_hidden_states=True)
    logits = heads(out.hidden_states[-1], v.model.get_output_embeddings().weight)
    assert logits.shape == (3, 1, 5, V)
    for k in range(3):  # zero-initialised residual blocks: every head starts as the verifier's LM head
        torch.testing.assert_close(logits[k], out.logits, atol=1e-5, rtol=1e-5)


def test_own_heads_initialised_from_verifier_and_truncated_vocab():
    v = tiny_verifier()
    token_map = torch.tensor([1, 4, 9, 20])
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=V, num_heads=2, draft_vocab_size=4), token_map=token_map)
    heads.init_lm_heads_from(v.model.lm_head.weight)
    assert heads.lm_heads[1].weight.shape == (4, 32)
    torch.testing.assert_close(heads.lm_heads[1].weight, v.model.lm_head.weight[token_map])
    assert heads.to_verifier_ids(torch.tensor([0, 3])).tolist() == [1, 20]
    with pytest.raises(SpecHeadsError, match="draft_vocab_size"):
        MedusaConfig(hidden_size=32, vocab_size=V, draft_vocab_size=V + 1)


def test_shared_head_over_a_truncated_vocabulary_scores_the_verifiers_rows(tmp_path):
    v = tiny_verifier()
    token_map = torch.tensor([1, 4, 9, 20])
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=V, num_heads=2, shared_lm_head=True, draft_vocab_size=4), token_map=token_map)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    out = v.model(ids, output_hidden_states=True)
    logits = heads(out.hidden_states[-1], v.model.get_output_embeddings().weight)
    assert logits.shape == (2, 1, 5, 4)
    torch.testing.assert_close(logits[0], out.logits[..., token_map], atol=1e-5, rtol=1e-5)
    final = train(recipe(tmp_path, "drafter.shared_lm_head=true", "drafter.draft_vocab_size=24", "training.max_steps=80", "training.eval_every=80", "training.lr=0.01"),
                  verifier=v, datasets=(counting_data(64, 0), counting_data(8, 1)), progress=False)
    drafter = build_drafter(final, v)
    prompt = [2 + (5 + i) % (V - 2) for i in range(8)]
    ref = v.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)[0, 8:].tolist()
    out = SpeculativeDecoder(v, drafter, num_draft_tokens=2, control="fixed").generate(prompt, max_new_tokens=20, eos_token_ids=[1])
    assert out.token_ids == ref
    # the blocks learned the counting pattern over the draft vocabulary (chance is 1/46 per head)
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    top1 = [h["eval/top1_head0"] for h in summary["history"] if "eval/top1_head0" in h][-1]
    assert top1 > 0.1, summary["history"]


def test_loss_matches_hand_computation():
    v = tiny_verifier()
    obj = MedusaObjective(v, DrafterSection(num_heads=2), ObjectiveSection(loss="ce", head_decay=0.5))
    batch = collate([{"input_ids": [3, 4, 5, 6, 7, 8], "prompt_length": 3}], pad_id=1)
    loss, metrics = obj.loss(obj.module, batch)
    h = v.model(batch["input_ids"], output_hidden_states=True).hidden_states[-1][0]
    heads = obj.module.heads
    expected = 0.0
    for k, w in enumerate([1.0, 0.5]):
        # head k at position t predicts token t+2+k; targets must be answer tokens (index >= 3)
        ts = [t for t in range(6 - 2 - k) if t + 2 + k >= 3]
        logits = heads.lm_heads[k](heads.blocks[k]["layers"][0](h[ts]))
        targets = torch.tensor([[3, 4, 5, 6, 7, 8][t + 2 + k] for t in ts])
        expected += w * torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, expected)
    assert set(metrics) >= {"loss/head0", "loss/head1", "loss"}


def test_training_learns_a_learnable_continuation(tmp_path):
    v = tiny_verifier()
    final = train(recipe(tmp_path), verifier=v, datasets=(counting_data(160, 0), counting_data(16, 1)), progress=False)
    heads = load_medusa_heads(final, v)
    obj = MedusaObjective(v, DrafterSection(num_heads=3), ObjectiveSection())
    obj.module.heads = heads
    counts = obj.eval_counts(obj.module, collate(list(counting_data(16, 2)), pad_id=1))
    summary = obj.summarize(counts)
    # chance is 1/48; the counting pattern is learnable from the hidden state
    assert all(summary[f"eval/top1_head{k}"] > 0.9 for k in range(3)), summary
    assert summary["eval/tau_top1_chain"] > 3.0
    # the trained heads really speed up decoding on counting prompts, losslessly
    drafter = build_drafter(final, v)
    prompt = [2 + (5 + i) % (V - 2) for i in range(8)]
    ref = v.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30)[0, 8:].tolist()
    out = SpeculativeDecoder(v, drafter, num_draft_tokens=3, control="fixed").generate(prompt, max_new_tokens=30, eos_token_ids=[1])
    assert out.token_ids == ref
    # The checkpoint records each head's held-out accuracy per rank; autoN trees are built from it.
    acc = heads.rank_accuracy
    assert acc is not None and [len(row) for row in acc] == [4, 4, 4]
    assert all(row[0] > 0.9 and sum(row) <= 1 + 1e-6 for row in acc), acc  # a token has one rank
    assert build_drafter(final, v, tree="auto").tree == "auto16"  # the default: goodput control cuts it per step
    tree = build_drafter(final, v, tree="auto5")
    assert {(0,), (0, 0), (0, 0, 0)} <= set(tree.paths) and len(tree.paths) == 5
    out = SpeculativeDecoder(v, tree, num_draft_tokens=3, control="fixed").generate(prompt, max_new_tokens=30, eos_token_ids=[1])
    assert out.token_ids == ref


def test_best_tree_takes_the_most_probable_paths_and_needs_recorded_accuracy():
    from specheads.drafters.medusa import best_tree, tree_paths

    acc = [[0.5, 0.2, 0.1], [0.4, 0.1, 0.05]]
    # (0,) .5; then (1,) .2 ties (0, 0) .2: the shallower first; then (0, 0); then (2,) .1 over (0, 1) .05
    assert best_tree(acc, 4) == [(0,), (1,), (0, 0), (2,)]
    assert best_tree(acc, 100) == sorted(best_tree(acc, 100), key=lambda p: -eval("*".join(
        str(acc[d][r]) for d, r in enumerate(p))))  # all 3 + 9 paths, most probable first
    assert len(best_tree(acc, 100)) == 12
    with pytest.raises(SpecHeadsError, match="auto6.*does not hold"):
        tree_paths("auto6", 2, None)
    # --tree auto: the best 16-node tree, or the 16-node preset without recorded accuracy
    from specheads.drafters.medusa import device_tree

    # goodput control cuts the tree each step, so auto is generous on every device
    assert device_tree("cpu", True) == "auto16" and device_tree("cpu", False) == "tree16"
    assert device_tree("cuda", True) == "auto16" and device_tree("cuda", False) == "tree16"
    with pytest.raises(SpecHeadsError, match="autoN needs a node count"):
        tree_paths("autox", 2, acc)


def test_eval_counts_rank_accuracy_given_earlier_heads_in_their_top_ranks():
    """Head 1's conditional rate counts only positions where head 0 had its token in its top ranks."""
    from specheads.drafters.medusa import rank_accuracy

    v = tiny_verifier()
    obj = MedusaObjective(v, DrafterSection(num_heads=2), ObjectiveSection(loss="ce"))
    tokens = [3, 4, 5, 6, 7, 8]
    batch = collate([{"input_ids": tokens, "prompt_length": 2}], pad_id=1)
    right = {0: [True, True, False, False], 1: [True, False, True]}  # head k at position t, label tokens[t + 2 + k]

    def head_logits(module, hidden, k):
        n = hidden.shape[1]
        logits = -torch.arange(V, dtype=torch.float32).repeat(1, n, 1)  # ranks follow token ids...
        for t in range(n):  # ...with the label first, or last (out of the top ranks)
            logits[0, t, tokens[t + 2 + k]] = 10.0 if right[k][t] else -1e4
        return logits

    obj._head_logits = head_logits
    summary = obj.summarize(obj.eval_counts(obj.module, batch))
    assert summary["eval/top1_head0"] == summary["eval/cond_rank0_head0"] == 0.5
    assert summary["eval/top1_head1"] == pytest.approx(2 / 3)  # t = 0 and t = 2
    assert summary["eval/cond_rank0_head1"] == 0.5  # only t = 0 and t = 1 are reached: head 0 missed at t = 2
    assert summary["eval/cond_rank1_head1"] == 0.0
    assert rank_accuracy(summary, 2)[1][0] == 0.5  # trees are built from the conditional rates
    unconditional = {k: x for k, x in summary.items() if "cond_" not in k}
    assert rank_accuracy(unconditional, 2)[1][0] == pytest.approx(2 / 3)  # drafters that recorded only those


def test_frozen_lm_heads_train_only_the_blocks(tmp_path):
    v = tiny_verifier()
    final = train(recipe(tmp_path, "objective.train_lm_heads=false", "training.max_steps=10", "training.eval_every=10"),
                  verifier=v, datasets=(counting_data(32, 0), counting_data(8, 1)), progress=False)
    heads = load_medusa_heads(final, v)
    for k in range(3):  # the own LM heads are still the verifier's, the blocks moved
        torch.testing.assert_close(heads.lm_heads[k].weight, v.model.lm_head.weight)
        assert heads.blocks[k]["layers"][0].weight.abs().sum() > 0


def test_checkpoint_round_trip_and_wrong_verifier(tmp_path):
    v = tiny_verifier()
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=V, num_heads=2))
    heads.init_lm_heads_from(v.model.lm_head.weight)
    torch.nn.init.normal_(heads.blocks[0]["layers"][0].weight)
    save_medusa(tmp_path / "ckpt", heads, v)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["specheads"]["drafter_kind"] == "medusa"
    assert config["specheads"]["verifier"]["vocab_size"] == V
    loaded = load_medusa_heads(tmp_path / "ckpt", v)
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), heads(x))
    other = tiny_verifier(seed=1)  # same shapes, different weights
    with pytest.raises(SpecHeadsError, match="LM head hash"):
        load_medusa_heads(tmp_path / "ckpt", other)
    bigger = tiny_verifier(seed=0, vocab=64)
    with pytest.raises(SpecHeadsError, match="vocab_size=48"):
        build_drafter(str(tmp_path / "ckpt"), bigger)


def test_corrupt_checkpoint_is_refused(tmp_path):
    v = tiny_verifier()
    save_medusa(tmp_path / "ckpt", MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=V, num_heads=1)), v)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SpecHeadsError, match="corrupt or truncated"):
        load_drafter_state(tmp_path / "ckpt", v)
    with pytest.raises(SpecHeadsError, match="not found"):
        load_drafter_state(tmp_path / "missing", v)


class Interrupted(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    import specheads.training.loop as loop

    v = tiny_verifier()
    data = (counting_data(96, 0), counting_data(8, 1))
    full = train(recipe(tmp_path / "full"), verifier=v, datasets=data, progress=False)

    real_save = loop.save_checkpoint

    def save_then_crash(accelerator, objective, module, output_dir, step, history):
        real_save(accelerator, objective, module, output_dir, step, history)
        if step == 40:
            raise Interrupted  # the job dies right after its step-40 checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        train(recipe(tmp_path / "cut"), verifier=v, datasets=data, progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert not os.path.exists(tmp_path / "cut" / "drafter")
    # a half-written checkpoint (no trainer_state.json) must be ignored on resume
    os.makedirs(tmp_path / "cut" / "checkpoints" / "step-50")
    resumed = train(recipe(tmp_path / "cut"), verifier=v, datasets=data, resume=True, progress=False)
    a, b = load_drafter_state(full)[1], load_drafter_state(resumed)[1]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("override, named", [
    ("training.lr=-1", "training.lr=-1"),
    ("training.max_steps=0", "training.max_steps=0"),
    ("objective.loss=mse", "mse"),
    ("training.nonsense=1", "training.nonsense"),
    ("drafter.num_heads=0", "drafter.num_heads=0"),
])
def test_bad_recipe_values(tmp_path, override, named):
    with pytest.raises(SpecHeadsError) as exc:
        recipe(tmp_path, override)
    assert named in str(exc.value)


def test_every_recipe_file_loads():
    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    names = [n for n in os.listdir(root) if n.endswith(".yaml")]
    assert names
    for name in names:
        load_recipe(os.path.join(root, name))


SCRIPT = r"""
import sys, json, torch
sys.path.insert(0, {tests!r})
from test_medusa_training import tiny_verifier, counting_data, recipe
from specheads.training.loop import train
torch.set_num_threads(1)
v = tiny_verifier()
train(recipe({out!r}, "training.max_steps=20", "training.save_every=100", "training.eval_every=100", "training.log_every=1",
             "training.cache_hidden_states={cache}"),
      verifier=v, datasets=(counting_data(64, 0), counting_data(8, 1)), progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["verifier-each-step", "hidden-state-cache"])
def test_two_processes_match_one(tmp_path, cache):
    """DDP over two gloo processes gives the same losses and weights as one process at the same global
    batch, also when both processes fill and read one shared hidden-state cache (3 epochs here)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        script = tmp_path / f"run{procs}.py"
        script.write_text(SCRIPT.format(tests=tests, out=str(out), cache=str(cache).lower()))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs)]
        cmd += ["--multi_gpu"] if procs > 1 else ["--cpu"]
        env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd + [str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "training_summary.json").read_text())
        assert (out / "drafter" / "model.safetensors").is_file()
        results[procs] = [h["loss"] for h in summary["history"] if "loss" in h]
    loss1, loss2 = results[1], results[2]
    assert len(loss1) == len(loss2) > 5
    # Step 1 sees identical weights and the same global batch split over two processes: the
    # global-token-mean loss must agree to float rounding.
    assert abs(loss1[0] - loss2[0]) < 1e-5
    # Later steps: each process pads its half-batch differently, and Adam's first updates are
    # nearly sign(g), which turns float-rounding differences in near-zero gradients into small
    # weight differences. The trajectories must still agree closely.
    torch.testing.assert_close(torch.tensor(loss1), torch.tensor(loss2), atol=0, rtol=3e-2)


def test_medusa2_trains_lora_jointly_and_saves_the_adapted_verifier(tmp_path):
    """Medusa-2: LoRA adapters join after the heads' warm-up; the merged verifier is saved and the
    heads decode losslessly with respect to it."""
    from specheads.verifier import load_verifier

    v = tiny_verifier()
    before = {n: p.clone() for n, p in v.model.named_parameters()}
    r = recipe(tmp_path, "training.max_steps=30", "training.lora={r: 4, alpha: 8, heads_warmup_steps: 10, lr: 0.01, target_modules: [q_proj, v_proj]}")
    final = train(r, verifier=v, datasets=(counting_data(64, 0), counting_data(8, 1)), progress=False)
    adapted = load_verifier(str(tmp_path / "verifier"), device="cpu")
    changed = [n for n, p in adapted.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed), changed
    drafter = build_drafter(final, adapted)
    prompt = [2 + (7 + i) % (V - 2) for i in range(8)]
    ref = adapted.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)[0, 8:].tolist()
    out = SpeculativeDecoder(adapted, drafter, num_draft_tokens=3, control="fixed").generate(prompt, max_new_tokens=20, eos_token_ids=[1])
    assert out.token_ids == ref


def test_hidden_state_cache_skips_the_verifier_after_the_first_epoch(tmp_path, capsys):
    v = tiny_verifier()
    data = (counting_data(32, 0), counting_data(8, 1))  # 4 steps per epoch at batch 8
    plain = train(recipe(tmp_path / "plain", "training.max_steps=12"), verifier=v, datasets=data, progress=False)
    calls = []
    real_forward = v.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs.get("input_ids", args[0] if args else None).shape[0])
        return real_forward(*args, **kwargs)

    v.model.forward = counting_forward
    try:
        cached = train(recipe(tmp_path / "cached", "training.max_steps=12", "training.cache_hidden_states=true"),
                       verifier=v, datasets=data, progress=False)
    finally:
        v.model.forward = real_forward
    assert "bytes per token" in capsys.readouterr().out
    # 3 epochs of 4 steps: only the first epoch's 4 training batches run the verifier, plus 1 eval batch
    assert sum(1 for b in calls if b == 8) == 4 + 1, calls  # without the cache: 12 + 1
    a, b = load_drafter_state(plain)[1], load_drafter_state(cached)[1]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


def test_hidden_state_cache_is_shared_by_key_and_refused_for_other_data(tmp_path):
    """Two runs over the same data and verifier share one cache folder (the second never runs the
    verifier on training batches); the same folder is refused for other tokens of the same lengths."""
    v = tiny_verifier()
    shared = str(tmp_path / "shared_cache")
    data = (counting_data(32, 0), counting_data(8, 1))

    def verifier_batches(run: str, datasets=data) -> int:
        """Train 4 steps with the shared cache; count the verifier forwards over full batches of 8."""
        calls = []
        real_forward = v.model.forward
        v.model.forward = lambda *a, **k: calls.append(k.get("input_ids", a[0] if a else None).shape[0]) or real_forward(*a, **k)
        try:
            train(recipe(tmp_path / run, "training.max_steps=4", "training.cache_hidden_states=true", f"training.hidden_cache_dir={shared}"),
                  verifier=v, datasets=datasets, progress=False)
        finally:
            v.model.forward = real_forward
        return sum(1 for b in calls if b == 8)

    assert verifier_batches("a") == 4 + 1  # fills the cache
    assert verifier_batches("b") == 1  # the eval batch only
    # A cache written before caches were keyed is rebuilt, not trusted and not refused.
    meta_path = Path(shared) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["key"]
    meta_path.write_text(json.dumps(meta))
    assert verifier_batches("d") == 4 + 1
    assert "key" in json.loads(meta_path.read_text())
    other = Dataset.from_list([{**x, "input_ids": [2 + (t - 1) % (V - 2) for t in x["input_ids"]]} for x in data[0]])
    assert [len(x["input_ids"]) for x in other] == [len(x["input_ids"]) for x in data[0]]  # same lengths: only the key tells them apart
    assert other["input_ids"] != data[0]["input_ids"]
    with pytest.raises(SpecHeadsError, match="made for other data or another verifier"):
        verifier_batches("c", (other, data[1]))
