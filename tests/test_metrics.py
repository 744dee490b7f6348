"""DecodingStats: tau, per-position acceptance and merging, on hand-made step sequences."""

from __future__ import annotations

import pytest

from specheads.decoding.metrics import DecodingStats


def stats_of(steps):
    s = DecodingStats()
    for drafted, accepted, emitted in steps:
        s.observe_step(drafted, accepted, emitted)
    return s


def test_empty():
    s = DecodingStats()
    assert s.tau == 0.0
    assert s.acceptance_per_position == []
    assert s.acceptance_rate == 0.0
    assert s.mean_draft_length == 0.0


def test_plain_decoding_has_tau_one():
    s = stats_of([(0, 0, 1)] * 7)
    assert s.verify_steps == 7
    assert s.tau == 1.0
    assert s.acceptance_per_position == []
    assert s.drafted_at == [] and s.accepted_at == []
    assert s.mean_draft_length == 0.0


def test_tau_and_acceptance_per_position():
    # (drafted, accepted, emitted): emitted = accepted + 1 unless cut at eos.
    s = stats_of([(3, 3, 4), (3, 1, 2), (3, 0, 1), (2, 2, 3)])
    assert s.verify_steps == 4
    assert s.emitted_in_steps == 10
    assert s.tau == pytest.approx(10 / 4)
    assert s.drafted_at == [4, 4, 3]
    assert s.accepted_at == [3, 2, 1]
    # Position i: of the steps that drafted >= i + 1 tokens, the fraction that accepted draft i + 1.
    assert s.acceptance_per_position == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    assert s.acceptance_rate == pytest.approx(6 / 11)
    assert s.mean_draft_length == pytest.approx(11 / 4)


def test_steps_without_drafts_count_for_tau_only():
    s = stats_of([(2, 2, 3), (0, 0, 1)])
    assert s.tau == pytest.approx(2.0)
    assert s.acceptance_per_position == [1.0, 1.0]
    assert s.mean_draft_length == pytest.approx(1.0)


def test_eos_cut_counts_emitted_not_accepted():
    # All 4 drafts accepted, but an eos at the 2nd cut the step's output to 2 tokens.
    s = stats_of([(4, 4, 2)])
    assert s.tau == 2.0
    assert s.acceptance_per_position == [1.0, 1.0, 1.0, 1.0]


def test_merge():
    a = stats_of([(3, 3, 4), (3, 1, 2)])
    a.new_tokens, a.prefill_s, a.verify_s, a.draft_s, a.total_s = 7, 0.5, 1.0, 0.25, 2.0
    b = stats_of([(5, 4, 5), (1, 0, 1), (0, 0, 1)])
    b.new_tokens, b.prefill_s, b.verify_s, b.draft_s, b.total_s = 8, 0.25, 2.0, 0.5, 3.0
    both = stats_of([(3, 3, 4), (3, 1, 2), (5, 4, 5), (1, 0, 1), (0, 0, 1)])
    a.merge(b)
    assert a.verify_steps == 5
    assert a.emitted_in_steps == 13
    assert a.drafted_at == both.drafted_at == [4, 3, 3, 1, 1]
    assert a.accepted_at == both.accepted_at == [3, 2, 2, 1, 0]
    assert a.tau == pytest.approx(both.tau) == pytest.approx(13 / 5)
    assert a.acceptance_per_position == pytest.approx([3 / 4, 2 / 3, 2 / 3, 1.0, 0.0])
    assert a.new_tokens == 15
    assert (a.prefill_s, a.verify_s, a.draft_s, a.total_s) == pytest.approx((0.75, 3.0, 0.75, 5.0))
    # Merging into an empty (or shorter) stats extends its per-position lists.
    c = DecodingStats()
    c.merge(both)
    assert c.drafted_at == both.drafted_at and c.accepted_at == both.accepted_at and c.tau == both.tau
    # b was not modified by merging it into a.
    assert b.drafted_at == [2, 1, 1, 1, 1] and b.verify_steps == 3


def test_to_dict():
    s = stats_of([(2, 1, 2), (2, 2, 3)])
    s.new_tokens = 6
    d = s.to_dict()
    assert d["tau"] == pytest.approx(2.5)
    assert d["acceptance_per_position"] == pytest.approx([1.0, 0.5])
    assert d["acceptance_rate"] == pytest.approx(3 / 4)
    assert d["mean_draft_length"] == pytest.approx(2.0)
    assert d["verify_steps"] == 2 and d["new_tokens"] == 6
    assert set(d["time_s"]) == {"total", "prefill", "verify", "draft"}
