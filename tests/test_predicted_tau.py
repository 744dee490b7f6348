"""Evaluation that predicts serving: the chain tau predicted from EAGLE-3's held-out chain
acceptance (``eval/chain_acc_step*``), written at the end of training and printed by the
benchmark beside the tau it measures on the same drafter."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from conftest import cached_verifier
from specheads.bench import BenchConfig, BenchDrafter, markdown_table, predicted_tau, run_benchmark
from specheads.training.objectives.eagle3 import Eagle3Objective, predicted_chain_tau
from test_eagle3_training import conversations, datasets, recipe


def test_prediction_formula_on_known_accuracies():
    acc = [0.5, 0.4, 0.25]
    assert predicted_chain_tau(acc, 0) == 1.0
    assert predicted_chain_tau(acc, 1) == pytest.approx(1.5)
    assert predicted_chain_tau(acc, 2) == pytest.approx(1 + 0.5 + 0.5 * 0.4)
    assert predicted_chain_tau(acc, 3) == pytest.approx(1 + 0.5 + 0.2 + 0.05)
    assert predicted_chain_tau(acc, 4) is None  # deeper than evaluated
    assert predicted_chain_tau([1.0] * 5, 5) == 6.0  # every draft accepted: k + 1 tokens per step
    assert predicted_chain_tau([0.0, 1.0], 2) == 1.0


def test_summarize_records_the_prediction_for_every_evaluated_depth():
    chain_hits, chain_valid = torch.tensor([6, 3, 1]), torch.tensor([10, 6, 3])
    counts = {"rank_hits": torch.zeros(3, 4), "valid": torch.ones(3), "cond_rank_hits": torch.zeros(3, 4), "cond_valid": torch.ones(3),
              "chain_hits": chain_hits, "chain_valid": chain_valid, "run_sum": torch.tensor(0), "positions": torch.tensor(1)}
    out = Eagle3Objective.summarize(counts)
    a = [0.6, 0.5, 1 / 3]
    assert [out[f"eval/chain_acc_step{i}"] for i in range(3)] == pytest.approx(a)
    assert out["eval/tau_pred_k1"] == pytest.approx(1.6)
    assert out["eval/tau_pred_k2"] == pytest.approx(1.9)
    assert out["eval/tau_pred_k3"] == pytest.approx(1.9 + 0.1)
    assert "eval/tau_pred_k4" not in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny EAGLE-3 drafter through the real training loop, and what the loop printed."""
    from specheads.training.loop import train

    out = tmp_path_factory.mktemp("eagle3")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        drafter = train(recipe(out), verifier=cached_verifier("llama"), datasets=datasets(), progress=False)
    return out, drafter, printed.getvalue()


def test_training_writes_and_prints_the_prediction(trained):
    out, drafter, printed = trained
    summary = json.loads((out / "training_summary.json").read_text())
    ev = json.loads((out / "drafter" / "config.json").read_text())["specheads"]["hyper_parameters"]["training"]["eval"]
    chain = [ev[f"eval/chain_acc_step{i}"] for i in range(5)]
    predicted = summary["predicted_tau_chain"]
    assert list(predicted) == ["1", "2", "3", "4", "5"]
    for k in range(1, 6):
        assert predicted[str(k)] == pytest.approx(predicted_chain_tau(chain, k))
        assert ev[f"eval/tau_pred_k{k}"] == pytest.approx(predicted[str(k)])  # in the drafter's record too
    # a chain of 5 from the same positions: the held-out mean run of hits says the same
    assert predicted["5"] == pytest.approx(ev["eval/tau_chain"], abs=0.05)
    line = next(line for line in printed.splitlines() if "predicted tau of a chain of k drafts" in line)
    assert f"k=3 {predicted['3']:.2f}" in line and "--tree chain --control fixed" in line


def test_bench_prints_predicted_beside_measured(trained):
    from specheads.drafters import build_drafter

    _, folder, _ = trained
    v = cached_verifier("llama")
    chain, tree = build_drafter(folder, v, tree="chain"), build_drafter(folder, v, tree="dyn6")
    prompts = [p[:6] for p in conversations(8, 1)["input_ids"][:2]]
    cfg = BenchConfig(max_new_tokens=16, num_draft_tokens=(3,), control="fixed", hf_baselines=False)
    report = run_benchmark(v, [BenchDrafter(chain, "chain"), BenchDrafter(tree, "tree")], prompts, cfg, progress=False)
    spec = report["methods"]["speculative[chain]"]
    p = spec["predicted_tau"]
    assert p["k"] == 3 and p["tau"] == pytest.approx(predicted_chain_tau(chain.acceptance_prior, 3)) and p["comparable"] is True
    assert spec["identity"] == "exact"  # float32, greedy
    table = markdown_table(report)
    assert (f"- `speculative[chain]`: predicted chain tau (k=3) {p['tau']:.2f}, measured tau {spec['tau']:.2f}: "
            "the same configuration (a chain of 3 drafts, fixed control)") in table
    tree_line = next(line for line in table.splitlines() if line.startswith("- `speculative[tree]`: predicted chain tau (k=3)"))
    assert "NOT the same configuration: a tree" in tree_line and "`--tree chain --control fixed --num-draft-tokens 3`" in tree_line
    assert "identity: a difference is a tie where" in table
    json.dumps(report)

    # goodput control: not the configuration the prediction is for, and said so
    goodput = predicted_tau(chain, 3, "goodput")
    assert goodput["comparable"] is False and "goodput control" in goodput["compared"]
    assert predicted_tau(chain, 9, "fixed")["tau"] is None  # deeper than training evaluated
    assert predicted_tau(object(), 3, "fixed") is None  # a drafter without recorded chain acceptance
