"""Goodput control: what the engine verifies each step, which drafters it runs, and what it learns.

Unit tests drive ``GoodputController`` with hand-made proposals and cost curves; engine tests run
tiny verifiers with drafters that are right, wrong, or right only in the second half of a
generation, and check both the output (token for token the verifier's greedy output, whatever
was verified) and what the controller chose.
"""

from __future__ import annotations

import pytest
import torch

from conftest import EOS, cached_verifier, hf_greedy
from specheads.decoding.candidates import Candidates
from specheads.decoding.cost import CostCurve
from specheads.decoding.engine import SpeculativeDecoder
from specheads.decoding.goodput import Calibrator, GoodputController, merge, subtree
from specheads.drafters import NgramDrafter, build_drafter
from specheads.drafters.hybrid import HybridDrafter
from specheads.errors import SpecHeadsError


class Curve:
    """A fixed verify cost in ms per token count, deaf to what it observes."""

    def __init__(self, fn):
        self.fn = fn
        self.observed = []

    def __call__(self, q):
        return self.fn(q)

    def observe(self, q, seconds):
        self.observed.append(q)


FLAT = Curve(lambda q: 40.0)  # a GPU: a forward over 64 tokens costs what one does
STEEP = Curve(lambda q: 40.0 * q)  # every token adds a full forward's cost


def chain(tokens, scores):
    return Candidates.chain(tokens, scores=scores)


# -- the calibrator ---------------------------------------------------------------------------


def test_calibrator_starts_at_the_drafters_confidence_and_follows_evidence():
    cal = Calibrator()
    assert cal.estimate(0, 1, 0.95) > 0.9 and cal.estimate(0, 1, 0.03) < 0.05
    assert cal.estimate(1, 1, None) == pytest.approx(0.3)  # no score: the lookup prior
    for _ in range(50):  # an overconfident drafter: 0.95 said, never accepted
        cal.update(0, 1, 0.95, False)
    assert cal.estimate(0, 1, 0.95) < 0.1
    assert cal.estimate(0, 2, 0.95) > 0.9  # another depth is another estimate
    for _ in range(400):  # the text changed: accepted now
        cal.update(0, 1, 0.95, True)
    assert cal.estimate(0, 1, 0.95) > 0.8


# -- selection --------------------------------------------------------------------------------


def test_flat_cost_verifies_every_node_and_steep_cost_a_weak_drafter_none():
    proposal = [(0, chain([5, 6, 7], [0.6, 0.5, 0.4]))]
    flat = GoodputController(FLAT, 1).select(proposal, {0: 0.001})
    assert flat.candidates.tokens.tolist() == [5, 6, 7]
    assert flat.probs == pytest.approx([0.6, 0.3, 0.12], rel=0.2)
    weak = [(0, chain([5, 6], [0.05, 0.05]))]
    assert len(GoodputController(STEEP, 1).select(weak, {0: 0.001}).candidates) == 0  # a plain step pays more


def test_a_knee_in_the_cost_is_filled_and_not_passed():
    """Cost flat up to 4 tokens (3 nodes), then steep: a confident drafter fills the flat part."""
    knee = Curve(lambda q: 40.0 if q <= 4 else 40.0 * q)
    sel = GoodputController(knee, 1).select([(0, chain([1, 2, 3, 4, 5, 6], [0.99] * 6))], {0: 0.0})
    assert len(sel.candidates) == 3


def test_selection_keeps_a_connected_subtree_of_the_most_probable_nodes():
    # root children: a (0.7), b (0.2); a's children: c (0.9), d (0.05); c's child e (0.9)
    tokens, parents = [10, 11, 12, 13, 14], [-1, -1, 0, 0, 2]
    cands = Candidates(torch.tensor(tokens), torch.tensor(parents), scores=torch.tensor([0.7, 0.2, 0.9, 0.05, 0.9]))
    cost = Curve(lambda q: 40.0 + 12.0 * q)
    sel = GoodputController(cost, 1).select([(0, cands)], {0: 0.0})
    kept = sel.candidates.tokens.tolist()
    assert kept[:1] == [10] and 12 in kept and 14 in kept and 13 not in kept
    # parent-closed, re-indexed, topologically ordered
    for i, p in enumerate(sel.candidates.parents.tolist()):
        assert p < i
    assert sel.expected_accepted == pytest.approx(sum(sel.probs))


def test_merge_joins_the_same_token_under_the_same_path():
    a = chain([5, 6, 7], [0.5, 0.5, 0.5])
    b = Candidates(torch.tensor([5, 9, 6]), torch.tensor([-1, -1, 0]))
    merged, origins = merge([(0, a), (1, b)])
    assert merged.tokens.tolist() == [5, 6, 7, 9]
    assert merged.parents.tolist() == [-1, 0, 1, -1]
    assert [sorted(o.source for o in os) for os in origins] == [[0, 1], [0, 1], [0], [1]]
    assert origins[2] == [(0, 3, 0.5, 0, None)]  # (source, depth, score, rank among siblings, lookup match length)
    assert origins[3] == [(1, 1, None, 1, None)]  # b's second root child
    assert subtree(merged, [0, 1]).tokens.tolist() == [5, 6]


def test_sampled_sets_are_never_merged_only_cut_to_a_prefix():
    q = torch.full((3, 8), 1 / 8)
    sampled = Candidates.chain([1, 1, 2], q, scores=[0.9, 0.9, 0.1])  # a repeated token stays two draws
    lookup = Candidates.chain([1, 3])
    sel = GoodputController(Curve(lambda q: 40.0 + 15.0 * q), 2).select([(0, sampled), (1, lookup)], {0: 0.0, 1: 0.0})
    assert sel.candidates.draft_probs is not None  # the sampled set won, whole or as a prefix
    assert sel.candidates.tokens.tolist() == [1, 1][: len(sel.candidates)] and sel.candidates.is_chain


# -- planning ---------------------------------------------------------------------------------


def run_steps(ctl, accepted_fn, steps, draft_s=0.01):
    """Drive ``ctl`` for ``steps`` steps with one source proposing a 2-token chain; returns which
    steps ran it."""
    ran = []
    for t in range(steps):
        ctl.begin()
        run = ctl.should_run(0)
        ran.append(run)
        if run:
            ctl.add(0, chain([5, 6], [0.9, 0.9]), draft_s, 2)
        sel = ctl.select()
        n = accepted_fn(t) if len(sel.candidates) else 0
        ctl.update(sel, list(range(min(n, len(sel.candidates)))), 0.04)
    return ran


def test_a_drafter_that_does_not_pay_is_skipped_then_tried_less_and_less_then_comes_back():
    ctl = GoodputController(Curve(lambda q: 40.0 + 2.0 * q), 1)
    ran = run_steps(ctl, lambda t: 0, 200)  # never accepted, and a draft costs a quarter of a step
    assert sum(ran[:5]) >= 1 and sum(ran[100:]) <= 100 // 16 + 1, ran  # tried a few times, then every 16 steps
    gaps = [j - i for i, j in zip([t for t, r in enumerate(ran) if r], [t for t, r in enumerate(ran) if r][1:])]
    assert gaps[-1] >= 16  # probes spread out
    ran = run_steps(ctl, lambda t: 2, 300)  # the text turned predictable: drafts are accepted again
    assert sum(ran[-100:]) >= 95, ran[-100:]


def test_keep_going_stops_when_a_level_costs_more_than_it_can_bring():
    ctl = GoodputController(Curve(lambda q: 40.0), 1)
    keep = ctl.keep_going(0)
    assert keep(2, [[0.9]])  # no timing yet: go on
    ctl.select([(0, chain([5], [0.9]))], {0: 0.004}, {0: 1})  # 4 ms a level
    assert keep(2, [[0.9], [0.05]])
    assert not keep(5, [[0.05, 0.05, 0.05, 0.05]])  # the frontier is almost never reached


# -- the engine -------------------------------------------------------------------------------

PROMPTS = [(3, 17, 22, 9, 41, 5, 30), (12, 44, 8, 8, 19, 27)]


class Oracle:
    """Proposes the verifier's own greedy continuation (always accepted) from step ``switch`` on,
    and wrong tokens before it."""

    name = "oracle"
    needs_hidden_states = False

    def __init__(self, reference, prompt_len, switch=0):
        self.reference, self.prompt_len, self.switch = reference, prompt_len, switch
        self.calls = 0

    def start(self, prompt_ids):
        self.steps = 0

    def propose(self, ctx):
        self.calls += 1
        done = len(ctx.tokens) - self.prompt_len
        truth = self.reference[done : done + ctx.num_draft_tokens]
        if len(ctx.tokens) - self.prompt_len < self.switch:
            return Candidates.chain([(t + 1) % 64 for t in truth], scores=[0.9] * len(truth))
        return Candidates.chain(truth, scores=[0.9] * len(truth))

    def observe(self, n, emitted):
        pass


@pytest.mark.parametrize("switch", [0, 30, 10**6])
def test_engine_is_lossless_and_follows_whether_drafts_pay(switch):
    v = cached_verifier("llama")
    prompt = list(PROMPTS[0])
    ref = hf_greedy(v.model, prompt, 100, EOS)
    oracle = Oracle(ref, len(prompt), switch)
    out = SpeculativeDecoder(v, oracle, num_draft_tokens=4, cost=Curve(lambda q: 40.0 + 4.0 * q)).generate(
        prompt, max_new_tokens=100, eos_token_ids=[EOS])
    assert out.token_ids == ref
    s = out.stats
    if switch == 0:  # always right: every step verifies drafts and accepts them
        assert s.plain_steps == 0 and s.tau > 3
    elif switch == 30:  # wrong for the first 30 tokens: mostly plain steps, then back to drafting
        assert s.plain_steps >= 15 and s.tau > 1.5
    else:  # never right: almost every step is plain
        assert s.plain_steps >= 0.75 * s.verify_steps


def test_hybrid_merges_parts_and_is_lossless(arch):
    v = cached_verifier(arch)
    for prompt in PROMPTS:
        prompt = list(prompt) * 2  # repeats, so the n-gram part finds matches
        ref = hf_greedy(v.model, prompt, 40, EOS)
        hybrid = HybridDrafter([Oracle(ref, len(prompt), switch=20), NgramDrafter()])
        for control in ("goodput", "fixed"):
            # A clock that stands still: drafting costs nothing, so nothing depends on the machine's load.
            out = SpeculativeDecoder(v, hybrid, num_draft_tokens=4, control=control, cost=FLAT, clock=lambda: 0.0).generate(
                prompt, max_new_tokens=40, eos_token_ids=[EOS])
            assert out.token_ids == ref, control
            assert out.stats.tau > 1.2


def test_hybrid_from_the_command_line_name(tmp_path):
    v = cached_verifier("llama")
    d = build_drafter("ngram+suffix", v, max_ngram=2)
    assert isinstance(d, HybridDrafter) and [p.name for p in d.parts] == ["ngram", "suffix"] and d.parts[0].max_ngram == 2
    assert d.labels == ["ngram", "suffix"]
    with pytest.raises(SpecHeadsError, match="'ngram\\+'"):
        build_drafter("ngram+", v)
    with pytest.raises(SpecHeadsError, match="at least two parts, got 1"):
        HybridDrafter([NgramDrafter()])


def test_goodput_reads_the_stored_cost_and_refines_it_from_each_step():
    v = cached_verifier("llama")
    curve = Curve(lambda q: 40.0)
    dec = SpeculativeDecoder(v, NgramDrafter(), num_draft_tokens=3, cost=curve)
    dec.generate(list(PROMPTS[1]) * 3, max_new_tokens=20, eos_token_ids=[])
    assert len(curve.observed) >= 10  # every verify forward was reported
    assert dec.cost_curve() is curve
