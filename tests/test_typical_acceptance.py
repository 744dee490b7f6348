"""Medusa's typical acceptance: a LOSSY opt-in, off by default."""

import torch

from specheads.decoding.candidates import Candidates
from specheads.decoding.verify import typical_acceptance


def test_rule_accepts_probable_tokens_and_follows_the_most_probable_child():
    V = 6
    probs = torch.full((4, V), 0.02)
    probs[0, 3] = 0.9  # root: token 3 very likely, token 5 not
    probs[1, 4] = 0.9
    probs[3, 2] = 0.9
    probs = probs / probs.sum(-1, keepdim=True)
    # root children: node 0 (token 5, improbable) and node 1 (token 3, probable); node 2 = child of node 1 (token 4)
    cands = Candidates(torch.tensor([5, 3, 4]), torch.tensor([-1, -1, 1]))
    path, nxt = typical_acceptance(probs, cands, torch.Generator().manual_seed(0))
    assert path == [1, 2]
    assert 0 <= nxt < V
    # a threshold above every probability rejects all
    path, _ = typical_acceptance(probs, cands, posterior_threshold=1.0, posterior_alpha=10.0)
    assert path == []


def test_walk_takes_the_most_probable_acceptable_child_not_the_first_or_last():
    """Three acceptable children at each level, the most probable in the middle: a walk taking
    the first or the last acceptable child (or any other than the most probable) goes elsewhere."""
    V = 8
    probs = torch.zeros(1 + 7, V)
    probs[0, [0, 1, 2, 7]] = torch.tensor([0.30, 0.45, 0.20, 0.05])  # root row
    probs[2, [4, 3, 5, 7]] = torch.tensor([0.25, 0.50, 0.15, 0.10])  # row of node 1 (token 1)
    probs[1, 6] = probs[3, 6] = 1.0  # rows of nodes 0 and 2: token 6 only
    probs[4:, 6] = 1.0  # rows of the grandchildren nodes 3..5
    probs[5, :] = 0
    probs[5, 5] = 1.0  # row of node 4 (token 3 under node 1): the next token is 5, surely
    # root children: nodes 0, 1, 2 (tokens 0, 1, 2); children of node 1: nodes 3, 4, 5 (tokens 4, 3, 5)
    # plus node 6 (token 7) under node 1, improbable enough to fail the threshold.
    cands = Candidates(torch.tensor([0, 1, 2, 4, 3, 5, 7]), torch.tensor([-1, -1, -1, 1, 1, 1, 1]))
    # every child but node 6 passes the default floor min(0.09, 0.3 exp(-H)) <= 0.09
    path, nxt = typical_acceptance(probs, cands, torch.Generator().manual_seed(0))
    assert path == [1, 4] and nxt == 5
    assert cands.tokens[path].tolist() == [1, 3]
    # threshold 0 and alpha 0: every token passes; the walk still picks the most probable child
    path, nxt = typical_acceptance(probs, cands, torch.Generator().manual_seed(0), posterior_threshold=0.0, posterior_alpha=0.0)
    assert path == [1, 4] and nxt == 5
    # a floor between the children's probabilities keeps the choice among those above it: at
    # threshold 0.4 only node 1 (0.45) passes at the root and only node 4 (0.5) below it.
    path, nxt = typical_acceptance(probs, cands, torch.Generator().manual_seed(0), posterior_threshold=0.4, posterior_alpha=10.0)
    assert path == [1, 4] and nxt == 5
    # at threshold 0.46 nothing passes at the root: no path, the next token is drawn from row 0
    path, nxt = typical_acceptance(probs, cands, torch.Generator().manual_seed(0), posterior_threshold=0.46, posterior_alpha=10.0)
    assert path == [] and nxt in (0, 1, 2, 7)


def test_engine_uses_it_only_when_asked(monkeypatch):
    import specheads.decoding.engine as engine
    from conftest import cached_verifier
    from specheads import SamplingParams, SpeculativeDecoder
    from specheads.drafters import DraftModelDrafter

    v = cached_verifier("llama")
    calls = []
    real = engine.typical_acceptance

    def spy(probs, cands, *args, **kwargs):
        path, nxt = real(probs, cands, *args, **kwargs)
        calls.append((cands.tokens.tolist(), path, nxt))
        return path, nxt

    monkeypatch.setattr(engine, "typical_acceptance", spy)
    drafter = DraftModelDrafter(v.model, v.vocab_size)
    sampling = SamplingParams(temperature=1.0)
    SpeculativeDecoder(v, drafter, num_draft_tokens=3, control="fixed").generate([3, 4, 5], max_new_tokens=12, sampling=sampling, seed=0, eos_token_ids=[])
    assert calls == []  # default: exact speculative sampling
    out = SpeculativeDecoder(v, drafter, num_draft_tokens=3, typical_acceptance={}, control="fixed").generate(
        [3, 4, 5], max_new_tokens=12, sampling=sampling, seed=0, eos_token_ids=[])
    assert calls and len(out.token_ids) == 12
    # The engine emits exactly the rule's accepted path and next token, step by step: the first
    # token comes from the prefill, then each step's accepted drafts and the rule's token.
    emitted = out.token_ids[:1]
    for tokens, path, nxt in calls:
        emitted += [tokens[i] for i in path] + [nxt]
    assert emitted[:12] == out.token_ids
    assert any(path for _, path, _ in calls)  # some step kept drafts, so the path mattered
    assert sum(out.stats.accepted_at) == sum(len(path) for _, path, _ in calls)
