"""Distilling a draft model from the verifier (DistillSpec): losses, students, objective, training,
the saved model directory, resume and on-policy data, on tiny random models."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from conftest import VOCAB, make_model, make_verifier
from specheads.checkpoint import read_config
from specheads.decoding.engine import SpeculativeDecoder
from specheads.drafters import DraftModelDrafter, build_drafter
from specheads.errors import SpecHeadsError
from specheads.student import build_student, load_student_model
from specheads.training.distill import DistillObjective, chain_tau
from specheads.training.loop import collate, train
from specheads.training.losses import DIVERGENCES, acceptance_rate, divergence, forward_kl, jsd, reverse_kl, total_variation
from specheads.training.objectives import check_recipe_for_verifier
from specheads.training.recipe import load_recipe

EOS = 1


def logits_of(*dists):
    return torch.log(torch.tensor(dists, dtype=torch.float32))


def counting_data(n, seed, vocab=VOCAB):
    """Prompts then an answer that counts upward: a continuation a one-layer student can match."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(3, vocab, (1,), generator=g))
        length = int(torch.randint(16, 28, (1,), generator=g))
        rows.append({"input_ids": [3 + (start + i) % (vocab - 3) for i in range(length)], "prompt_length": 5})
    return Dataset.from_list(rows)


def recipe(tmp_path, *overrides):
    return load_recipe(None, [
        f"training.output_dir={tmp_path}", "drafter.kind=draft_model", "drafter.student.layers=first:1",
        "training.batch_size=8", "training.lr=0.01", "training.max_steps=24", "training.warmup_steps=2",
        "training.eval_every=12", "training.save_every=8", "training.log_every=4", "training.dtype=float32", *overrides,
    ])


@pytest.fixture(scope="module")
def teacher():
    return make_verifier("llama", seed=0)


# ----------------------------------------------------------------------------- losses

P, Q = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]


def test_losses_against_hand_computed_values():
    s, t = logits_of(Q), logits_of(P)
    fkl = sum(p * math.log(p / q) for p, q in zip(P, Q))
    rkl = sum(q * math.log(q / p) for p, q in zip(P, Q))
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    js = beta * sum(p * math.log(p / x) for p, x in zip(P, m)) + (1 - beta) * sum(q * math.log(q / x) for q, x in zip(Q, m))
    assert forward_kl(s, t)[0].item() == pytest.approx(fkl, rel=1e-5)
    assert reverse_kl(s, t)[0].item() == pytest.approx(rkl, rel=1e-5)
    assert jsd(s, t, beta=beta)[0].item() == pytest.approx(js, rel=1e-5)
    assert total_variation(s, t)[0].item() == pytest.approx(0.3, rel=1e-5)  # 1/2 (0.3 + 0.2 + 0.1)
    assert acceptance_rate(s, t).item() == pytest.approx(0.7, rel=1e-5)  # min: 0.4 + 0.2 + 0.1
    # temperature 2 on both: the distributions are softmax(log p / 2)
    p2 = torch.tensor(P).sqrt() / torch.tensor(P).sqrt().sum()
    q2 = torch.tensor(Q).sqrt() / torch.tensor(Q).sqrt().sum()
    assert forward_kl(s, t, temperature=2.0)[0].item() == pytest.approx(float((p2 * (p2 / q2).log()).sum()), rel=1e-5)
    # rows are summed and counted, for the loop's global-count normalisation
    total, count = forward_kl(torch.cat([s, s]), torch.cat([t, t]))
    assert count.item() == 2 and total.item() == pytest.approx(2 * fkl, rel=1e-5)


def test_jsd_edges_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    torch.testing.assert_close(jsd(s, t, beta=0.0)[0], forward_kl(s, t)[0])
    torch.testing.assert_close(jsd(s, t, beta=1.0)[0], reverse_kl(s, t)[0])
    assert 0 < jsd(s, t, beta=0.5)[0].item() <= 5 * math.log(2) + 1e-5  # JSD is bounded by log 2 per row


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_equal_distributions_give_zero(name):
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    logits[:, 0] = float("-inf")  # a masked token in both
    for beta in (0.0, 0.5, 1.0):
        value, _ = divergence(name, logits.clone(), logits.clone(), beta=beta)
        assert abs(value.item()) < 1e-5, (name, beta, value)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_disjoint_supports_and_masked_logits_stay_finite(name, beta):
    student = torch.tensor([[0.0, 0.0, -1e4, -1e4], [0.0, float("-inf"), float("-inf"), 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, -1e4, 0.0, 0.0], [0.0, float("-inf"), float("-inf"), 0.0]])
    value, count = divergence(name, student, teacher, beta=beta)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all(), (name, beta, value, student.grad)
    assert count.item() == 2
    row0 = divergence(name, student[:1], teacher[:1], beta=beta)[0].item()  # disjoint
    expected = 1.0 if name == "tvd" else math.log(2) if (name, beta) == ("jsd", 0.5) else 1e4  # KL: large, finite
    assert row0 == pytest.approx(expected, rel=1e-3)


def test_tvd_is_one_minus_acceptance():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 13, generator=g) * 3, torch.randn(6, 13, generator=g) * 3
    p, q = t.softmax(-1), s.softmax(-1)
    tvd = total_variation(s, t)[0]
    torch.testing.assert_close(tvd, (1 - torch.minimum(p, q).sum(-1)).sum())
    torch.testing.assert_close(tvd, 6 - acceptance_rate(s, t).sum())


def test_chain_tau():
    assert chain_tau(0.0, 4) == 1.0
    assert chain_tau(1.0, 4) == 5.0
    assert chain_tau(0.5, 3) == pytest.approx((1 - 0.5**4) / 0.5)


# ----------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
def test_each_loss_falls_over_a_few_steps(tmp_path, teacher, loss):
    r = recipe(tmp_path, f"objective.loss={loss}", "objective.ce_weight=0.1")
    obj = DistillObjective(teacher, r.drafter, r.objective)
    batch = collate(list(counting_data(8, 0)), pad_id=EOS)
    optimizer = torch.optim.Adam(obj.module.parameters(), lr=0.01)
    losses = []
    for _ in range(6):
        value, metrics = obj.loss(obj.module, batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert set(metrics) >= {f"loss/{loss}", "loss/ce", "loss"}
    assert losses[-1] < 0.8 * losses[0], losses


def test_loss_is_on_answer_positions_only(teacher, tmp_path):
    """Changing a prompt-only position's prediction target leaves the loss alone; the loss is the
    mean divergence over positions whose next token is an answer token."""
    r = recipe(tmp_path)
    obj = DistillObjective(teacher, r.drafter, r.objective)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9, 10], "prompt_length": 3}], pad_id=EOS)
    value, _ = obj.loss(obj.module, batch)
    ids = batch["input_ids"]
    s, t = obj.module(ids).logits[0], teacher.model(ids).logits[0]
    torch.testing.assert_close(value, forward_kl(s[2:5], t[2:5])[0] / 3)  # positions 2..4 predict tokens 3..5


# ----------------------------------------------------------------------------- students and bad input


def test_student_vocabulary_mismatch_is_refused(tmp_path, teacher):
    other = make_model("llama", vocab=VOCAB + 8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SpecHeadsError, match=rf"vocabulary size {VOCAB + 8} but the verifier .* has {VOCAB}"):
        load_student_model(str(tmp_path / "other"), teacher)
    r = recipe(tmp_path / "run", "drafter.student.source=model", f"drafter.student.path={tmp_path / 'other'}")
    with pytest.raises(SpecHeadsError, match=f"{VOCAB + 8}.*{VOCAB}"):
        check_recipe_for_verifier(r, teacher)


def test_model_directory_with_the_verifiers_vocabulary_is_a_student(tmp_path, teacher):
    make_model("qwen2", seed=3).save_pretrained(tmp_path / "small")
    r = recipe(tmp_path / "run", "drafter.student.source=model", f"drafter.student.path={tmp_path / 'small'}")
    student = build_student(r.drafter.student, teacher)
    assert student.get_output_embeddings().weight.shape[0] == VOCAB


def test_layer_indices_out_of_range_fail_before_any_data(tmp_path, teacher):
    r = recipe(tmp_path, "drafter.student.layers=0,7")
    with pytest.raises(SpecHeadsError, match=r"drafter.student.layers='0,7'.*\[7\] out of range .* 2 layers"):
        train(r, verifier=teacher, progress=False)  # datasets=None: it would self-distil next


@pytest.mark.parametrize("override, named", [
    ("drafter.student.layers=every:0", "drafter.student.layers='every:0'"),
    ("drafter.student.layers=a,b", "drafter.student.layers='a,b'"),
    ("drafter.student.source=scratch", "drafter.student.source='scratch'"),
    ("drafter.student.source=model", "drafter.student.path=None"),
    ("objective.loss=kl", "objective.loss='kl'"),
    ("objective.jsd_beta=1.5", "objective.jsd_beta=1.5"),
    ("objective.temperature=0", "objective.temperature=0"),
    ("objective.on_policy_fraction=2", "objective.on_policy_fraction=2"),
    ("drafter.draft_vocab_size=100", "drafter.draft_vocab_size=100"),
    ("drafter.kind=eagle", "drafter.kind='eagle'"),
])
def test_bad_distill_recipe_values(tmp_path, override, named):
    with pytest.raises(SpecHeadsError) as exc:
        recipe(tmp_path, override)
    assert named in str(exc.value)


def test_fresh_config_needs_a_consistent_shape(tmp_path):
    base = ["drafter.student.source=config", "drafter.student.num_layers=1"]
    with pytest.raises(SpecHeadsError, match="drafter.student.hidden_size=None"):
        recipe(tmp_path, *base, "drafter.student.num_heads=2")
    with pytest.raises(SpecHeadsError, match="hidden_size=30 is not a multiple of drafter.student.num_heads=4"):
        recipe(tmp_path, *base, "drafter.student.hidden_size=30", "drafter.student.num_heads=4")


def test_distill_settings_are_refused_for_medusa(tmp_path):
    with pytest.raises(SpecHeadsError, match="objective.on_policy_fraction=0.5 is for drafter.kind=draft_model"):
        load_recipe(None, [f"training.output_dir={tmp_path}", "objective.on_policy_fraction=0.5"])
    with pytest.raises(SpecHeadsError, match="objective.loss='tvd' is not a loss for drafter.kind=medusa"):
        load_recipe(None, [f"training.output_dir={tmp_path}", "objective.loss=tvd"])


# ----------------------------------------------------------------------------- training, saving, resume


def acceptance(objective, module, data):
    counts = objective.eval_counts(module, collate(list(data), pad_id=EOS))
    return objective.summarize(counts)


def test_trained_student_accepts_more_and_its_directory_loads_everywhere(tmp_path, teacher):
    r = recipe(tmp_path, "objective.loss=tvd", "drafter.student.source=config", "drafter.student.hidden_size=32",
               "drafter.student.num_layers=1", "drafter.student.num_heads=2", "training.max_steps=40", "training.eval_every=40")
    untrained = DistillObjective(teacher, r.drafter, r.objective, seed=r.training.seed)
    held_out = counting_data(16, 2)
    before = acceptance(untrained, untrained.module, held_out)
    final = train(r, verifier=teacher, datasets=(counting_data(96, 0), counting_data(8, 1)), progress=False)

    # a plain Hugging Face model directory, plus the specheads block
    model = AutoModelForCausalLM.from_pretrained(final)
    config = read_config(final)["specheads"]
    assert config["drafter_kind"] == "draft_model"
    assert config["verifier"]["vocab_size"] == VOCAB and config["hyper_parameters"]["objective"]["loss"] == "tvd"
    assert os.path.isfile(os.path.join(final, "model.safetensors"))
    after = acceptance(untrained, model, held_out)
    assert after["eval/acceptance_T1"] > before["eval/acceptance_T1"] + 0.1, (before, after)
    assert after["eval/top1_agreement"] > before["eval/top1_agreement"], (before, after)
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert any("eval/tau_k4_T1" in h for h in summary["history"])

    # specheads' registry loads it as a draft model and decodes losslessly; HF assisted generation takes it too
    drafter = build_drafter(final, teacher)
    assert isinstance(drafter, DraftModelDrafter)
    prompt = list(held_out[0]["input_ids"][:6])
    ref = teacher.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=EOS, pad_token_id=2)[0, 6:].tolist()
    out = SpeculativeDecoder(teacher, drafter, num_draft_tokens=3, control="fixed").generate(prompt, max_new_tokens=20, eos_token_ids=[EOS])
    assert out.token_ids == ref
    assert out.stats.tau > 1.0
    assisted = teacher.model.generate(torch.tensor([prompt]), assistant_model=model, do_sample=False, max_new_tokens=20,
                                      eos_token_id=EOS, pad_token_id=2)[0, 6:].tolist()
    assert assisted == ref
    # ... and refuses it for another verifier (the metadata names the one it was trained for)
    with pytest.raises(SpecHeadsError, match="LM head hash"):
        build_drafter(final, make_verifier("llama", seed=5))

    # The folder ranks the training answers' tokens (draft_vocab.json); --draft-vocab N scores only
    # the top N of them, still losslessly.
    ranking = json.loads((Path(final) / "draft_vocab.json").read_text())
    answers = [t for x in counting_data(96, 0) for t in x["input_ids"][x["prompt_length"]:]]
    assert sorted(ranking["token_ids"]) == sorted(set(answers))
    assert ranking["counts"] == sorted(ranking["counts"], reverse=True) and sum(ranking["counts"]) == len(answers)
    assert ranking["counts"][0] == max(answers.count(t) for t in set(answers))
    cut = build_drafter(final, teacher, draft_vocab=8)
    assert cut.draft_vocab.tolist() == ranking["token_ids"][:8]
    out = SpeculativeDecoder(teacher, cut, num_draft_tokens=3, control="fixed").generate(prompt, max_new_tokens=20, eos_token_ids=[EOS])
    assert out.token_ids == ref
    with pytest.raises(SpecHeadsError, match=r"--draft-vocab 100000 is out of range: .* ranks \d+ tokens"):
        build_drafter(final, teacher, draft_vocab=100000)
    (Path(final) / "draft_vocab.json").unlink()
    with pytest.raises(SpecHeadsError, match="has no draft_vocab.json .*`specheads draft-vocab"):
        build_drafter(final, teacher, draft_vocab=8)


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run_with_on_policy_data(tmp_path, teacher, monkeypatch):
    import specheads.training.loop as loop

    on_policy = ("objective.on_policy_fraction=0.5", "objective.on_policy_max_new_tokens=6", "objective.loss=jsd")
    data = (counting_data(48, 0), counting_data(8, 1))
    full = train(recipe(tmp_path / "full", *on_policy), verifier=teacher, datasets=data, progress=False)
    history = json.loads((tmp_path / "full" / "training_summary.json").read_text())["history"]
    assert sum(h.get("data/on_policy_examples", 0) for h in history) > 0  # the on-policy path ran

    real_save = loop.save_checkpoint

    def save_then_crash(accelerator, objective, module, output_dir, step, history):
        real_save(accelerator, objective, module, output_dir, step, history)
        if step == 16:
            raise Interrupted

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        train(recipe(tmp_path / "cut", *on_policy), verifier=teacher, datasets=data, progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = train(recipe(tmp_path / "cut", *on_policy), verifier=teacher, datasets=data, resume=True, progress=False)
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_on_policy_answers_come_from_the_student(tmp_path, teacher):
    r = recipe(tmp_path, "objective.on_policy_fraction=1.0", "objective.on_policy_max_new_tokens=5", "objective.on_policy_temperature=0")
    obj = DistillObjective(teacher, r.drafter, r.objective)
    rows = list(counting_data(3, 4))
    batch = collate(rows, pad_id=EOS, indices=[0, 1, 2])
    new, replaced = obj._on_policy(obj.module, batch)
    assert replaced == 3
    for i, row in enumerate(rows):
        plen = row["prompt_length"]
        ids = new["input_ids"][i][new["attention_mask"][i].bool()].tolist()
        assert ids[:plen] == row["input_ids"][:plen]  # the prompt is kept
        assert new["answer_mask"][i].tolist().index(1) == plen
        greedy = obj.module.generate(torch.tensor([ids[:plen]]), do_sample=False, max_new_tokens=5, eos_token_id=EOS, pad_token_id=2)[0, plen:].tolist()
        stop = greedy.index(EOS) + 1 if EOS in greedy else len(greedy)
        assert ids[plen:] == greedy[:stop]  # the student's own greedy continuation
    assert obj.module.training  # generation left the student in training mode
    value, metrics = obj.loss(obj.module, batch)
    assert torch.isfinite(value) and metrics["data/on_policy_examples"] == 3


def test_hidden_state_cache_gives_the_same_student(tmp_path, teacher):
    data = (counting_data(16, 0), counting_data(8, 1))  # 2 steps per epoch
    plain = train(recipe(tmp_path / "plain", "training.max_steps=6"), verifier=teacher, datasets=data, progress=False)
    cached = train(recipe(tmp_path / "cached", "training.max_steps=6", "training.cache_hidden_states=true"),
                   verifier=teacher, datasets=data, progress=False)
    a = AutoModelForCausalLM.from_pretrained(plain).state_dict()
    b = AutoModelForCausalLM.from_pretrained(cached).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the bench names the best draft length


def test_bench_names_the_draft_length_with_the_best_measured_speedup():
    from conftest import cached_verifier, noisy_model
    from specheads.bench import BenchConfig, markdown_table, run_benchmark

    v = cached_verifier("llama")
    drafter = DraftModelDrafter(noisy_model("llama"), VOCAB)
    report = run_benchmark(v, drafter, [[5, 9, 13, 5, 9], [20, 21, 22, 23]], BenchConfig(max_new_tokens=12, num_draft_tokens=(1, 3), hf_baselines=False), progress=False)
    best = report["best_draft_length"]["drafter"]
    swept = {name: m for name, m in report["methods"].items() if name.startswith("speculative")}
    assert {m["num_draft_tokens"] for m in swept.values()} == {1, 3}
    winner = max(swept, key=lambda n: swept[n]["speedup"])
    assert best["method"] == winner and best["num_draft_tokens"] == swept[winner]["num_draft_tokens"]
    assert f"best draft length cap by measured speedup: k={best['num_draft_tokens']}" in markdown_table(report)
    fixed = run_benchmark(v, drafter, [[5, 9, 13, 5, 9]], BenchConfig(max_new_tokens=8, num_draft_tokens=(1, 3), control="fixed",
                                                                       hf_baselines=False), progress=False)
    assert "best draft length by measured speedup: k=" in markdown_table(fixed)


def test_one_draft_length_names_no_best_length():
    """Nothing was chosen between lengths, so no line says one was (the demo used to print 'k=4')."""
    from conftest import cached_verifier, noisy_model
    from specheads.bench import BenchConfig, markdown_table, run_benchmark

    v = cached_verifier("llama")
    drafter = DraftModelDrafter(noisy_model("llama"), VOCAB)
    report = run_benchmark(v, drafter, [[5, 9, 13, 5, 9]], BenchConfig(max_new_tokens=8, num_draft_tokens=(4,), hf_baselines=False), progress=False)
    assert "best draft" not in markdown_table(report)


DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import make_verifier
from test_distill import counting_data, recipe
from specheads.training.loop import train
torch.set_num_threads(1)
train(recipe({out!r}, "training.max_steps=8", "training.save_every=100", "training.eval_every=8", "training.log_every=1", *{extra!r}),
      verifier=make_verifier("llama", seed=0), datasets=(counting_data(32, 0), counting_data(8, 1)), progress=False)
"""


@pytest.mark.slow
def test_two_processes_match_one_and_on_policy_runs_under_ddp(tmp_path):
    """DDP over two gloo processes: the same losses as one process at the same global batch; with
    on-policy data each process generates for its own slice."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    losses = {}
    for procs, extra in ((1, ()), (2, ()), (2, ("objective.on_policy_fraction=0.5", "objective.on_policy_max_new_tokens=4"))):
        out = tmp_path / f"p{procs}-{len(extra)}"
        script = tmp_path / f"run{procs}-{len(extra)}.py"
        script.write_text(DDP_SCRIPT.format(tests=tests, out=str(out), extra=extra))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs)]
        cmd += ["--multi_gpu"] if procs > 1 else ["--cpu"]
        env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd + [str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert AutoModelForCausalLM.from_pretrained(out / "drafter") is not None
        summary = json.loads((out / "training_summary.json").read_text())
        losses[(procs, bool(extra))] = [h["loss"] for h in summary["history"] if "loss" in h]
    one, two = losses[(1, False)], losses[(2, False)]
    assert len(one) == len(two) == 8
    assert abs(one[0] - two[0]) < 1e-5  # same weights, same global batch: the global-token mean agrees
    torch.testing.assert_close(torch.tensor(one), torch.tensor(two), atol=0, rtol=3e-2)


def test_table_script_builds_a_fixed_dataset_the_verifier_did_not_write():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "distill_table.py")
    spec = importlib.util.spec_from_file_location("distill_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    records = table.docstring_conversations(20)
    assert len(records) == 20 and len({r["messages"][0]["content"] for r in records}) == 20
    assert all([t["role"] for t in r["messages"]] == ["user", "assistant"] and len(r["messages"][1]["content"]) >= 120 for r in records)
    class Args:
        fixed_path, on_policy_fraction, set = "/x/fixed.jsonl", 1.0, ["training.max_steps=3"]
    assert "data.self_distill=null" in table.cell_overrides("tvd", "fixed", Args, "/out/cell")
    assert "objective.on_policy_fraction=1.0" in table.cell_overrides("tvd", "on_policy", Args, "/out/cell")
    assert table.cell_overrides("fkl", "verifier", Args, "/out/cell")[-1] == "training.max_steps=3"  # user overrides win
