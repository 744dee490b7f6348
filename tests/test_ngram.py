"""NgramDrafter: the continuation of the most recent earlier match of the longest n-gram."""

from __future__ import annotations

import pytest

from specheads.decoding.candidates import Candidates, DraftContext
from specheads.decoding.sampling import SamplingParams
from specheads.drafters import NgramDrafter


def propose(tokens, k, **opts):
    d = NgramDrafter(**opts)
    d.start(list(tokens))
    c = d.propose(DraftContext(list(tokens), k, SamplingParams()))
    assert isinstance(c, Candidates) and c.is_chain and c.draft_probs is None
    return c.tokens.tolist()


def test_continuation_of_a_match():
    # The suffix [1, 2, 3] occurred at the start; what followed it is proposed.
    assert propose([1, 2, 3, 4, 5, 6, 1, 2, 3], 3) == [4, 5, 6]


def test_most_recent_match_wins():
    # [7, 8] occurs twice earlier; the later occurrence (followed by 30, 31) wins.
    assert propose([7, 8, 10, 11, 7, 8, 30, 31, 9, 7, 8], 2) == [30, 31]


def test_longest_ngram_wins_over_a_more_recent_shorter_one():
    # The 3-gram [1, 2, 3] matches at 0 (followed by 4, 5); the 1-gram [3] matches more recently
    # at 8 (followed by 9) and the 2-gram [2, 3] at 0 only. The longest n-gram wins.
    tokens = [1, 2, 3, 4, 5, 0, 0, 0, 3, 9, 6, 1, 2, 3]
    assert propose(tokens, 2) == [4, 5]
    # Limited to 1-grams, the most recent [3] wins instead.
    assert propose(tokens, 2, max_ngram=1) == [9, 6]


def test_prefers_3gram_match_over_2gram_match():
    # The 2-gram [5, 6] last occurred at 6 (followed by 40); the 3-gram [4, 5, 6] only at 0
    # (followed by 20).
    tokens = [4, 5, 6, 20, 21, 0, 5, 6, 40, 41, 4, 5, 6]
    assert propose(tokens, 1) == [20]
    assert propose(tokens, 1, max_ngram=2) == [40]


def test_no_match_gives_empty_candidates():
    assert propose([1, 2, 3, 4, 5], 4) == []
    assert propose([9], 4) == []  # a lone pending token has nothing before it
    # min_ngram=2: a 1-gram match is not enough.
    assert propose([1, 2, 3, 1], 4) == [2, 3, 1]
    assert propose([1, 2, 3, 1], 4, min_ngram=2) == []


def test_never_more_than_k():
    tokens = list(range(20)) + [0, 1, 2]
    for k in range(0, 12):
        out = propose(tokens, k)
        assert len(out) <= k
        assert out == list(range(3, 3 + k))


def test_continuation_stops_at_context_end():
    # The match is near the end: only the tokens that exist after it are proposed.
    assert propose([5, 6, 7, 5, 6], 10) == [7, 5, 6]


def test_overlapping_match_in_a_repeat():
    # In a run of one token, the most recent earlier match is one position back.
    assert propose([3, 3, 3, 3], 5) == [3]
    assert propose([1, 2, 1, 2, 1, 2], 4) == [1, 2]


def test_zero_draft_tokens():
    assert propose([1, 2, 1], 0) == []


@pytest.mark.parametrize("k", [1, 4])
def test_engine_clips_to_k(k):
    """Even a drafter that returns too many tokens gets clipped to k by the engine."""
    from specheads.decoding.engine import _clip

    c = Candidates.chain([1, 2, 3, 4, 5, 6])
    assert _clip(c, k).tokens.tolist() == [1, 2, 3, 4, 5, 6][:k]
