"""SuffixDrafter: SuffixDecoding's trees from the longest match, its sources, and the engine with it."""

from __future__ import annotations

import pytest
import torch

from conftest import EOS, REPETITIVE_PROMPTS, VOCAB, cached_verifier, greedy_reference
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.candidates import DraftContext
from specheads.decoding.sampling import SamplingParams
from specheads.drafters import SuffixDrafter, build_drafter
from specheads.drafters import suffix as suffix_module
from specheads.drafters.suffix_index import SuffixArray, index_verifier_info
from specheads.errors import SpecHeadsError

A, B, C, D, E, F, X, Q, Z, Y = range(10, 20)
# [A B C] is followed by D twice (then E or F) and by X once (then the sequence ends); the shorter
# match [C] is followed by Q far more often, which only a drafter ignoring the longest match proposes.
CORPUS = [[A, B, C, D, E], [A, B, C, D, F], [A, B, C, X]] + [[Z, C, Q]] * 5


def propose(drafter, context, k=8):
    drafter.start(list(context))
    c = drafter.propose(DraftContext(list(context), k, SamplingParams()))
    assert c.draft_probs is None
    return c


def tree(c):
    return c.tokens.tolist(), c.parents.tolist(), [round(s, 4) for s in c.scores.tolist()]


def drafter(corpus=CORPUS, **options):
    return SuffixDrafter(SuffixArray.build(corpus, sort_depth=40), **options)


def test_tree_of_the_longest_match_best_first_with_conditional_scores():
    d = drafter(spec_factor=2.0)
    c = propose(d, [7, A, B, C])
    # Path probabilities: D 2/3, X 1/3, E 1/3, F 1/3; ties keep the order they were found in.
    assert tree(c) == ([D, X, E, F], [-1, -1, 0, 0], [0.6667, 0.3333, 0.5, 0.5])
    assert Q not in c.tokens.tolist()
    assert d.last.source == "global" and d.last.match_length == 3 and d.last.score == pytest.approx(5 / 3)


def test_a_likely_grandchild_comes_before_an_unlikely_child():
    d = drafter([[A, B, C, D, E]] * 3 + [[A, B, C, X, Z]], spec_factor=2.0)
    assert tree(propose(d, [A, B, C])) == ([D, E, X, Z], [-1, 0, -1, 2], [0.75, 1.0, 0.25, 1.0])


@pytest.mark.parametrize("options,k,expected", [
    ({"spec_factor": 2.0}, 1, [D, X]),  # the engine's draft length caps the depth
    ({"spec_factor": 2.0, "max_depth": 1}, 8, [D, X]),
    ({"spec_factor": 2.0, "min_token_prob": 0.4}, 8, [D]),  # X, E and F have path probability 1/3
    ({"spec_factor": 2.0, "min_token_prob": 0.3}, 8, [D, X, E, F]),
    ({"spec_factor": 2.0, "max_nodes": 2}, 8, [D, X]),
    ({"spec_factor": 1.0}, 8, [D, X, E]),  # 1.0 x match length 3
    ({"spec_factor": 0.5}, 8, [D]),
    ({"spec_factor": 2.0}, 0, []),
])
def test_size_depth_and_pruning(options, k, expected):
    assert propose(drafter(**options), [7, A, B, C], k).tokens.tolist() == expected


def test_min_token_prob_prunes_by_path_probability():
    # D (2/3) then E or F (1/2 each): at 0.4 E and F go although each is half of D's continuations.
    c = propose(drafter(spec_factor=4.0, min_token_prob=0.4), [A, B, C])
    assert c.tokens.tolist() == [D]
    c = propose(drafter(spec_factor=4.0, min_token_prob=0.0), [A, B, C])
    assert sorted(c.tokens.tolist()) == sorted([D, X, E, F])


def test_nothing_matches_gives_empty_candidates():
    d = drafter()
    assert len(propose(d, [99, 98])) == 0 and d.last is None
    # [A B C X] ends its sequence: no continuation of X is known, and the request has none either.
    assert len(propose(d, [A, B, C, X])) == 0
    assert len(propose(SuffixDrafter(), [5])) == 0


def test_the_request_itself_is_a_source():
    d = SuffixDrafter(max_nodes=8)
    c = propose(d, [1, 2, 3, 4, 5, 1, 2, 3])
    assert tree(c) == ([4, 5, 1], [-1, 0, 1], [1.0, 1.0, 1.0]) and d.last.source == "request"


def test_the_higher_score_wins_between_request_and_global():
    d = drafter([[1, 2, 3, 40, 41, 42, 43]] * 2, spec_factor=2.0)
    # The global index matches [1 2 3]: 40 41 42 43, each certain, score 4. The request matches
    # only [3] (budget 2 x 1): 50 51, score 2.
    c = propose(d, [3, 50, 51, 7, 1, 2, 3])
    assert d.last.source == "global" and c.tokens.tolist() == [40, 41, 42, 43] and d.last.score == 4
    # The request matching [2 3] (budget 4): 50 51 52 53, score 4, a tie, which the request wins.
    c = propose(d, [2, 3, 50, 51, 52, 53, 1, 2, 3])
    assert d.last.source == "request" and c.tokens.tolist() == [50, 51, 52, 53]
    # Matching all of [1 2 3] (budget 6), the request's tree is larger still.
    c = propose(d, [1, 2, 3, 50, 51, 52, 53, 54, 9, 1, 2, 3])
    assert d.last.source == "request" and c.tokens.tolist() == [50, 51, 52, 53, 54, 9]


def test_history_counts_add_to_the_corpus():
    d = drafter([[A, B, C, D]], spec_factor=2.0)
    for _ in range(2):  # two requests of this process went on with X
        d.start([A, B, C])
        d.propose(DraftContext([A, B, C, X], 4, SamplingParams()))
        d.observe(0, [Y])  # what the verifier emitted after X
    c = propose(d, [9, A, B, C])  # starting it commits the second request
    assert tree(c) == ([X, Y, D], [-1, 0, -1], [0.6667, 1.0, 0.3333])
    # Where the history matches longer ([9 A B C], then Y), the corpus's shorter match adds nothing.
    d.start([9, A, B])
    d.propose(DraftContext([9, A, B, C], 4, SamplingParams()))
    d.observe(0, [Y])
    c = propose(d, [9, A, B, C])
    assert tree(c) == ([Y], [-1], [1.0]) and d.last.match_length == 4


def test_history_is_indexed_once_large_and_keeps_its_answers(monkeypatch):
    monkeypatch.setattr(suffix_module, "HISTORY_SCAN_TOKENS", 20)
    d = SuffixDrafter(max_cached_requests=3, spec_factor=2.0)

    def serve(i):  # request i: [1 2 3] went on with 40 + i
        r = [30 + i, 1, 2, 3, 40 + i, 50 + i]
        d.start(r[:4])  # commits the request before
        d.propose(DraftContext(r[:5], 4, SamplingParams()))
        d.observe(0, r[5:])

    for i in range(4):
        serve(i)
        # 7 tokens a request (with its SEP): the third commit passes 20, and all are indexed.
        assert (d._history_sa is None) == (i < 3) and d._recent.size == (7 * i if i < 3 else 0)
    c = propose(d, [1, 2, 3], k=1)  # commits request 3, scanned: counts add across the two parts
    assert tree(c) == ([40, 41, 42, 43], [-1] * 4, [0.25] * 4)
    serve(4)
    serve(5)
    c = propose(d, [1, 2, 3], k=1)  # a rebuild keeps the newest max_cached_requests (3) requests
    assert len(d._history) == 3 and tree(c) == ([44, 45], [-1, -1], [0.5, 0.5])
    d.clear_history()
    assert len(propose(d, [1, 2, 3], k=1)) == 0


def test_unsynced_requests_commit_only_their_prompt():
    d = SuffixDrafter()
    d.start([1, 2, 3])
    d.observe(0, [8, 9])  # no propose yet: the verifier's first token is unknown, so 8, 9 are not trusted
    c = propose(d, [1, 2])
    assert c.tokens.tolist() == [3] and d.last.source == "global"


def test_bad_options_are_refused():
    for options in ({"max_depth": 0}, {"max_nodes": -1}, {"min_token_prob": 1.5}, {"spec_factor": 0},
                    {"max_match": True}, {"max_cached_requests": -2}):
        with pytest.raises(SpecHeadsError, match=list(options)[0]):
            SuffixDrafter(**options)
    with pytest.raises(SpecHeadsError, match="max_match 30 \\+ max_depth 20 exceeds the depth 40"):
        drafter(max_match=30, max_depth=20)


# ----------------------------------------------------------------------------- with the engine


def test_the_match_bound_from_the_last_step_changes_nothing(arch, verifier):
    """Each step starts from the last step's match length plus the tokens added since; the trees
    must be those a drafter without that memory proposes for the same context."""
    corpus = SuffixArray.build(noisy_corpus(arch, 40), sort_depth=40)
    compared = 0

    class Check(Recorder):
        def propose(self, ctx):
            c = super().propose(ctx)
            again = SuffixDrafter(corpus, spec_factor=2.0)
            again.start(ctx.tokens)
            other = again.propose(ctx)
            assert c.tokens.tolist() == other.tokens.tolist() and c.parents.tolist() == other.parents.tolist()
            nonlocal compared
            compared += 1
            return c

    for prompt in REPETITIVE_PROMPTS:
        d = Check(SuffixDrafter(corpus, spec_factor=2.0))
        out = SpeculativeDecoder(verifier, d, num_draft_tokens=4).generate(list(prompt), max_new_tokens=40, eos_token_ids=[EOS])
        assert max(out.stats.accepted_at) >= 2  # steps that added several tokens at once
    assert compared > 10


class Recorder:
    def __init__(self, inner):
        self.inner, self.name, self.needs_hidden_states = inner, inner.name, inner.needs_hidden_states
        self.proposes_trees = True
        self.proposals = []

    def start(self, prompt_ids):
        self.inner.start(prompt_ids)

    def propose(self, ctx):
        c = self.inner.propose(ctx)
        self.proposals.append(c)
        return c

    def observe(self, n, emitted):
        self.inner.observe(n, emitted)


def noisy_corpus(arch: str, n_new: int) -> list[list[int]]:
    """Each prompt's greedy continuation twice with different tokens changed, and once exact for
    every other prompt: the trees branch, and some branches are wrong."""
    seqs = []
    for i, prompt in enumerate(REPETITIVE_PROMPTS):
        ref = list(prompt) + list(greedy_reference(arch, prompt, n_new, EOS))
        for shift in (3, 5):
            seqs.append([(t + 1) % VOCAB if j % shift == 0 else t for j, t in enumerate(ref)])
        if i % 2 == 0:
            seqs.append(ref)
    return seqs


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_decoding_with_suffix_trees_is_lossless(arch, verifier, k):
    n_new = 40
    d = Recorder(SuffixDrafter(SuffixArray.build(noisy_corpus(arch, n_new), sort_depth=40), spec_factor=2.0))
    decoder = SpeculativeDecoder(verifier, d, num_draft_tokens=k)
    accepted = drafted = 0
    for prompt in REPETITIVE_PROMPTS:  # one drafter: later prompts also see the earlier requests
        out = decoder.generate(list(prompt), max_new_tokens=n_new, eos_token_ids=[EOS])
        assert out.token_ids == list(greedy_reference(arch, prompt, n_new, EOS)), prompt
        accepted += sum(out.stats.accepted_at)
        drafted += sum(out.stats.drafted_at)
    assert accepted > 0 and accepted < drafted, (accepted, drafted)
    if k > 1:
        assert any(len(c) and not c.is_chain for c in d.proposals), "no branching tree was verified"
    assert all(c.scores is not None and len(c.scores) == len(c) for c in d.proposals)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_a_repeated_request_is_drafted_from_the_first(arch_name):
    v = cached_verifier(arch_name)
    prompt, n_new = [44, 9, 33, 21, 5, 58], 40
    fresh = SpeculativeDecoder(v, SuffixDrafter(), num_draft_tokens=4).generate(prompt, max_new_tokens=n_new, eos_token_ids=[EOS])
    d = SuffixDrafter()
    decoder = SpeculativeDecoder(v, d, num_draft_tokens=4)
    first = decoder.generate(prompt, max_new_tokens=n_new, eos_token_ids=[EOS])
    again = decoder.generate(prompt, max_new_tokens=n_new, eos_token_ids=[EOS])
    assert again.token_ids == first.token_ids == fresh.token_ids
    acc = again.stats.acceptance_per_position
    assert len(acc) == 4 and min(acc) >= 0.9, acc
    assert again.stats.tau >= 4.0 and again.stats.tau > fresh.stats.tau + 1.5, (again.stats.tau, fresh.stats.tau)


def test_sampling_at_t1_runs():
    v = cached_verifier("llama")
    d = SuffixDrafter(SuffixArray.build(noisy_corpus("llama", 40), sort_depth=40), spec_factor=2.0)
    out = SpeculativeDecoder(v, d, num_draft_tokens=4).generate(
        list(REPETITIVE_PROMPTS[0]), max_new_tokens=40, sampling=SamplingParams(temperature=1.0), eos_token_ids=[EOS], seed=3)
    assert 1 <= len(out.token_ids) <= 40 and all(0 <= t < VOCAB for t in out.token_ids)
    assert out.finish_reason in ("eos", "length") and sum(out.stats.drafted_at) > 0


# ----------------------------------------------------------------------------- the registry


def test_build_drafter_suffix_and_suffix_file(tmp_path):
    v, other = cached_verifier("llama"), cached_verifier("llama", 1)
    assert isinstance(build_drafter("suffix", v, max_nodes=4), SuffixDrafter)
    path = SuffixArray.build(CORPUS, sort_depth=40).save(tmp_path / "c.safetensors", {"verifier": index_verifier_info(v)})
    d = build_drafter(f"suffix:{path}", v, spec_factor=2.0)
    assert d.corpus.num_tokens == sum(map(len, CORPUS)) and "c.safetensors" in d.detail
    assert propose(d, [A, B, C]).tokens.tolist() == [D, X, E, F]
    with pytest.raises(SpecHeadsError, match=f"{v.name}.*{other.name}|{other.name}.*{v.name}"):
        build_drafter(f"suffix:{path}", other)
    with pytest.raises(SpecHeadsError, match="suffix index not found"):
        build_drafter(f"suffix:{tmp_path / 'none.safetensors'}", v)
    with pytest.raises(SpecHeadsError, match="suffix:FILE"):
        build_drafter("suffixx", v)
