"""The tie bound: how far q-token verify forwards move the top-2 logit gap from plain decoding's
1-token forwards, measured per verifier and dtype, stored like the cost curve, and used by the
benchmark's identity check."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_verifier
from specheads.bench import classify_differences, describe_tie_rule, tie_bound
from specheads.decoding import tie_bound as tb

SMALL = dict(new_tokens=24, chains=(2, 5, 16), tree_depths=(3,))  # a few seconds on a tiny model


def top1_nudged_in_multi_token_forwards(model, delta: float):
    """A forward hook moving each row's top-1 logit by +delta / -delta (alternately by row) in every
    forward of more than one token: a verifier whose q-token forwards move every top-2 gap by
    exactly delta (or flip the token where the gap was below it) against its 1-token ones."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            logits = output.logits
            sign = torch.tensor([1.0, -1.0], dtype=logits.dtype).repeat(logits.shape[1])[: logits.shape[1]]
            top = logits.argmax(-1, keepdim=True)
            logits.scatter_add_(-1, top, (delta * sign)[None, :, None].expand_as(top).to(logits.dtype))
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_float32_bound_is_float32_noise():
    entry = tb.measure_tie_bound(make_verifier("llama", seed=5), **SMALL)
    assert entry["positions"] >= 3 * 4 * 20 and entry["flips"] == 0
    assert entry["q"] == [2, 5, 7, 16]  # chains of 2, 5, 16 tokens and a tree of depth 3 (7 tokens)
    assert entry["max_gap_change"] < 1e-4 and entry["bound"] == pytest.approx(tb.SAFETY * entry["max_gap_change"])


@pytest.mark.parametrize("delta", [0.05, 0.5])
def test_bound_covers_a_known_multi_token_difference_and_classifies_by_it(delta):
    v = make_verifier("llama", seed=5)
    handle = top1_nudged_in_multi_token_forwards(v.model, delta)
    try:
        entry = tb.measure_tie_bound(v, **SMALL)
    finally:
        handle.remove()
    # every compared gap moved by delta (float32 rounding aside); a flip counts what it needed
    assert entry["max_gap_change"] == pytest.approx(delta, abs=1e-4)
    assert entry["median_gap_change"] == pytest.approx(delta, abs=1e-4)
    bound = entry["bound"]
    assert bound >= delta
    ref, margins, tops = [[5, 6, 7]], [[3.0, 0.0, 3.0]], [[10.0, 10.0, 10.0]]
    margins[0][1] = 0.9 * bound
    tie = classify_differences([[5, 9, 7]], ref, margins, tops, torch.float32, measured=bound)
    assert tie["identity"] == "ties" and tie["differences"][0]["bound"] == pytest.approx(bound)
    # without the measured bound float32 is held to its 4 ulps: the same difference is a mismatch
    assert classify_differences([[5, 9, 7]], ref, margins, tops, torch.float32)["identity"] == "mismatch"
    margins[0][1] = 1.1 * bound
    assert classify_differences([[5, 9, 7]], ref, margins, tops, torch.float32, measured=bound)["identity"] == "mismatch"


def test_the_ulps_rule_is_the_floor():
    assert tie_bound(torch.bfloat16, 20.0, measured=0.01) == pytest.approx(0.5)  # 4 bfloat16 ulps at 20
    assert tie_bound(torch.bfloat16, 20.0, measured=0.8) == pytest.approx(0.8)
    assert tie_bound(torch.bfloat16, 20.0, measured=None) == pytest.approx(0.5)


def test_stored_bound_is_reused_and_keyed_by_dtype(tmp_path, monkeypatch):
    store = tmp_path / "tie_bound.json"
    v = make_verifier("llama", seed=5)
    assert tb.stored_tie_bound(v, store=store) is None
    first = tb.tie_bound_for(v, store=store, quiet=True, **SMALL)
    assert first["source"] == "measured"

    def no_measuring(*a, **k):
        raise AssertionError("measured again although a bound is stored")

    monkeypatch.setattr(tb, "measure_tie_bound", no_measuring)
    again = tb.tie_bound_for(v, store=store, quiet=True, **SMALL)
    assert again["source"] == "stored" and again["bound"] == first["bound"]
    assert tb.stored_tie_bound(v, store=store)["bound"] == first["bound"]

    monkeypatch.undo()
    v.model.to(torch.bfloat16)  # another dtype: another key, measured anew
    assert tb.stored_tie_bound(v, store=store) is None
    bf16 = tb.tie_bound_for(v, store=store, quiet=True, **SMALL)
    assert bf16["source"] == "measured" and bf16["dtype"] == "bfloat16"
    keys = list(json.loads(store.read_text()))
    assert len(keys) == 2 and sum("|float32|" in k for k in keys) == 1 and sum("|bfloat16" in k for k in keys) == 1
    # bfloat16 forwards over several tokens round differently: its bound is far above float32's
    assert bf16["max_gap_change"] > 100 * max(first["max_gap_change"], 1e-7)

    store.write_text(json.dumps({k: {"bound": "wide"} for k in keys}))  # a hand edit: measured again
    assert tb.tie_bound_for(v, store=store, quiet=True, **SMALL)["source"] == "measured"


def test_the_rule_in_words():
    entry = {"bound": 0.5, "safety": 2.0, "max_gap_change": 0.25, "p99_gap_change": 0.1, "positions": 900, "q": [2, 64],
             "dtype": "bfloat16", "source": "stored"}
    words = describe_tie_rule(entry, "bfloat16")
    assert "below 0.5 = 2 x the largest change of the top-2 logit gap between q-token and 1-token forwards (0.25" in words
    assert "or 4 ulps of the top-1 logit in bfloat16 if larger" in words
    assert "no tie bound measured" in describe_tie_rule({"bound": None, "source": "ulps"}, "float32")


@pytest.mark.slow
def test_smollm2_bfloat16_moves_gaps_past_four_ulps_and_float32_stays_at_noise():
    """The real SmolLM2 (issue 20): in bfloat16 q-token forwards moved top-2 gaps by up to 0.29
    (quick set; 0.37 over the full set) at top logits near 24, where the float32 top-16 head leaves
    them: the layers' bfloat16 arithmetic, not the logit's own rounding. So the measured bound
    exceeds 4 ulps wherever the top logit is small, as in the issue's mismatch (gap 0.254 at a top
    logit of 2.08, 4 ulps = 0.0625), which it classifies as a tie. float32 moved them by 1.7e-5."""
    from specheads.verifier import load_verifier

    bf16 = tb.measure_tie_bound(load_verifier("smollm2-135m", dtype="bfloat16", device="cpu"), **tb.QUICK)
    assert bf16["positions"] >= 4 * 32
    assert bf16["max_gap_change"] > 2 * tie_bound(torch.bfloat16, 2.08)  # measured 0.29 against 4 ulps = 0.0625
    issue = classify_differences([[7, 1]], [[7, 2]], [[3.0, 0.254]], [[20.0, 2.08]], torch.bfloat16, measured=bf16["bound"])
    assert issue["identity"] == "ties"
    assert classify_differences([[7, 1]], [[7, 2]], [[3.0, 0.254]], [[20.0, 2.08]], torch.bfloat16)["identity"] == "mismatch"

    f32 = tb.measure_tie_bound(load_verifier("smollm2-135m", dtype="float32", device="cpu"), **tb.QUICK)
    assert f32["flips"] == 0 and f32["bound"] < 1e-3 < bf16["bound"] / 100
