"""EAGLE-3 through the real training loop (``specheads.training.loop.train``) on a tiny verifier:
the drafter folder it writes loads through the drafter registry and decodes losslessly, the
final held-out evaluation travels in the drafter's config, the feature cache is filled once and
reused by a second run over the same data, and two gloo DDP processes train the same weights as
one process at the same global batch."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from conftest import EOS, VOCAB, cached_verifier, hf_greedy
from specheads.checkpoint import load_drafter_state
from specheads.decoding import SpeculativeDecoder
from specheads.drafters import build_drafter
from specheads.drafters.eagle3 import Eagle3Drafter
from specheads.training.loop import train
from specheads.training.recipe import load_recipe

PROMPT_LEN, ANSWER_LEN = 4, 20
BATCH = 8


@functools.lru_cache(maxsize=None)
def conversations(n: int, seed: int) -> Dataset:
    """Tiny 'conversations': a random prompt and the verifier's own greedy reply (teacher-forced
    data whose every answer token is the verifier's argmax). All rows have one length, so one
    process and two pad nothing differently."""
    v = cached_verifier("llama")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=g).tolist()
        reply = hf_greedy(v.model, prompt, ANSWER_LEN, None)
        rows.append({"input_ids": prompt + reply, "prompt_length": PROMPT_LEN})
    return Dataset.from_list(rows)


def datasets():
    return conversations(24, 0), conversations(8, 1)  # 3 steps per epoch at batch 8, one eval batch


def recipe(out, *overrides):
    return load_recipe(None, [
        f"training.output_dir={out}", "drafter.kind=eagle3", "drafter.aux_layer_ids=[1, 2, 2]",
        "drafter.draft_vocab_size=48", "objective.ttt_steps=3", f"training.batch_size={BATCH}", "training.lr=0.003",
        "training.warmup_steps=2", "training.max_steps=12", "training.eval_every=12", "training.save_every=6",
        "training.log_every=1", "training.cache_hidden_states=true", "training.dtype=float32", *overrides,
    ])


def counting_verifier_batches(v, fn):
    """Run ``fn`` with the verifier's forward counted; returns (result, forwards over full batches)."""
    calls = []
    real_forward = v.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs.get("input_ids", args[0] if args else None).shape[0])
        return real_forward(*args, **kwargs)

    v.model.forward = counting_forward
    try:
        result = fn()
    finally:
        v.model.forward = real_forward
    return result, sum(1 for b in calls if b == BATCH)


def test_eagle3_trains_through_the_loop_loads_decodes_and_reuses_its_feature_cache(tmp_path):
    v = cached_verifier("llama")
    shared = str(tmp_path / "features")
    first, forwards = counting_verifier_batches(
        v, lambda: train(recipe(tmp_path / "a", f"training.hidden_cache_dir={shared}"), verifier=v, datasets=datasets(), progress=False))
    # 12 steps = 4 epochs of 3 batches: only the first epoch runs the verifier, plus the one eval batch
    assert forwards == 3 + 1, forwards
    # one folder for this verifier, dtype and aux layers, holding the segments this process wrote
    (folder,) = [f for f in os.listdir(shared) if os.path.isfile(os.path.join(shared, f, "meta.json"))]
    assert folder.startswith("float32-aux1.2.2-") and any(n.endswith(".rows") for n in os.listdir(os.path.join(shared, folder)))

    # The folder loads through the registry as an EAGLE-3 drafter (a dynamic tree too).
    assert build_drafter(first, v).tree == "auto"  # the whole dynamic tree, cut per step by goodput control
    drafter = build_drafter(first, v, tree="chain")
    assert isinstance(drafter, Eagle3Drafter) and drafter.tree == "chain"
    assert drafter.model.config.draft_vocab_size == 48 and drafter.hidden_layers == (1, 2, 2)
    # ... and decodes losslessly: greedy tokens equal transformers' greedy generate, as a chain and a tree.
    tree = build_drafter(first, v, tree="dyn6", top_k=3)
    accepted = 0
    for prompt in conversations(8, 1)["input_ids"][:3]:
        prompt = prompt[:PROMPT_LEN + 2]
        ref = hf_greedy(v.model, prompt, 24, EOS)
        for d in (drafter, tree):
            out = SpeculativeDecoder(v, d, num_draft_tokens=4, control="fixed").generate(prompt, max_new_tokens=24, eos_token_ids=[EOS])
            assert out.token_ids == ref
            accepted += sum(out.stats.accepted_at)
    assert accepted > 0

    # The final held-out evaluation is recorded in the drafter's config.
    config = json.loads((tmp_path / "a" / "drafter" / "config.json").read_text())
    record = config["specheads"]["hyper_parameters"]["training"]
    assert record["steps"] == 12
    ev = record["eval"]
    for i in range(5):  # at least EVAL_STEPS draft steps are evaluated
        assert 0.0 <= ev[f"eval/top1_step{i}"] <= 1.0
        for r in range(4):
            assert 0.0 <= ev[f"eval/cond_rank{r}_step{i}"] <= 1.0
    assert ev["eval/top1_step0"] <= ev["eval/top4_step0"] <= 1.0 + 1e-6 and ev["eval/tau_chain"] >= 1.0
    assert drafter.model.training_record["eval"] == ev
    summary = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert losses[-1] < losses[0], losses  # it trained

    # A second run over the same data reads every feature from the shared store (the eval batch's
    # too: the store is keyed by tokens, not by dataset), and its weights are the first run's.
    second, forwards = counting_verifier_batches(
        v, lambda: train(recipe(tmp_path / "b", f"training.hidden_cache_dir={shared}"), verifier=v, datasets=datasets(), progress=False))
    assert forwards == 0, forwards
    a, b = load_drafter_state(first)[1], load_drafter_state(second)[1]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import cached_verifier
from test_eagle3_training import datasets, recipe
from specheads.training.loop import train
train(recipe({out!r}, "training.max_steps=6", "training.save_every=100", "training.eval_every=6", "training.cache_hidden_states={cache}"),
      verifier=cached_verifier("llama"), datasets=datasets(), progress=False)
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """DDP over two gloo processes (each half of the global batch of 8, both filling and reading one
    feature cache over 2 epochs) gives the same losses and weights as one process."""
    tests = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        script = tmp_path / f"run{procs}.py"
        script.write_text(SCRIPT.format(tests=tests, out=str(out), cache="true"))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--main_process_port", "0"]
        cmd += ["--multi_gpu"] if procs > 1 else ["--cpu"]
        env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd + [str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "training_summary.json").read_text())
        results[procs] = ([h["loss"] for h in summary["history"] if "loss" in h], load_drafter_state(out / "drafter")[1],
                          json.loads((out / "drafter" / "config.json").read_text())["specheads"]["hyper_parameters"]["training"]["eval"])
        assert isinstance(build_drafter(str(out / "drafter"), cached_verifier("llama")), Eagle3Drafter)
    (loss1, w1, ev1), (loss2, w2, ev2) = results[1], results[2]
    assert len(loss1) == len(loss2) == 6
    assert abs(loss1[0] - loss2[0]) < 1e-5  # same weights, same global batch: the same global mean loss
    torch.testing.assert_close(torch.tensor(loss1), torch.tensor(loss2), atol=0, rtol=1e-3)
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-4, rtol=1e-3)
    for key in ev1:  # the evaluation, summed over both processes' halves of the eval set
        assert ev1[key] == pytest.approx(ev2[key], abs=1e-6), key


def test_eval_counts_chain_acceptance_given_every_earlier_top1_hit():
    """eval/chain_acc_step{i}: of the positions where steps 0..i-1 all drafted the verifier's
    argmax, the share where step i does too (what a greedy chain is accepted at on this text)."""
    from specheads.training.objectives.eagle3 import Eagle3Objective

    obj = Eagle3Objective.__new__(Eagle3Objective)
    obj.steps = 3
    obj.draft_ids = torch.arange(4)
    # one sequence, 6 valid positions at step 0 (5 at step 1, 4 at step 2); logits pick token 0 or 1
    hit, miss = torch.tensor([9.0, 0, 0, 0]), torch.tensor([0, 9.0, 0, 0])
    rows = []
    pattern = [[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1], [1, 0, 1, 0]]  # top-1 hit per step and position
    for i, hits in enumerate(pattern):
        student = torch.stack([hit if h else miss for h in hits])
        valid = torch.ones(1, len(hits), dtype=torch.bool)
        rows.append((student, None, torch.zeros(len(hits), dtype=torch.long), valid))
    obj._steps = lambda module, batch, steps, teacher=False: rows + [None] * (steps - len(rows))
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    summary = Eagle3Objective.summarize(obj.eval_counts(None, batch))
    assert summary["eval/chain_acc_step0"] == pytest.approx(4 / 6)
    # step 1 at the 4 positions step 0 hit (0, 1, 3, 4): hits at 0, 3, 4
    assert summary["eval/chain_acc_step1"] == pytest.approx(3 / 4)
    # step 2 (4 positions) where steps 0 and 1 both hit (0, 3): hits at 0 only
    assert summary["eval/chain_acc_step2"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("native, expected", [("CPU has avx512_bf16", torch.bfloat16), (None, torch.float32)])
def test_training_dtype_auto_is_bfloat16_where_native_and_says_so(tmp_path, monkeypatch, capsys, native, expected):
    """training.dtype auto: the drafter computes in bfloat16 (autocast, float32 weights) where the
    device does bf16 natively, in float32 elsewhere; the run says which and why, and trains."""
    import specheads.verifier

    from specheads.training.loop import training_dtype

    monkeypatch.setattr(specheads.verifier, "native_bf16", lambda device: native)
    assert training_dtype("auto", "cpu")[0] == expected
    v = cached_verifier("llama")
    final = train(recipe(tmp_path / "run", "training.dtype=auto", "training.max_steps=8", "training.cache_hidden_states=false"),
                  verifier=v, datasets=datasets(), progress=True)
    out = capsys.readouterr().out
    assert f"the drafter trains in {str(expected).replace('torch.', '')} (training.dtype auto" in out
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert losses[-1] < losses[0], losses
    state = load_drafter_state(final)[1]
    assert all(t.dtype == torch.float32 for k, t in state.items() if t.is_floating_point())  # weights stay float32


def test_training_dtype_bfloat16_without_native_support_warns_with_the_measured_slowdown(monkeypatch):
    import specheads.verifier

    from specheads.training.loop import training_dtype

    monkeypatch.setattr(specheads.verifier, "native_bf16", lambda device: None)
    monkeypatch.setattr(specheads.verifier, "bf16_slowdown", lambda: 3.25)
    with pytest.warns(UserWarning, match=r"took 3\.2x the time of a float32 one"):
        dtype, why = training_dtype("bfloat16", "cpu")
    assert dtype == torch.bfloat16 and "emulated" in why and "3.2x" in why
