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
    # threshold 0 and alpha 0: every token passes; the walk still picks the most probable child
    path, _ = typical_acceptance(probs, cands, posterior_threshold=0.0, posterior_alpha=0.0)
    assert path == [1, 2]
    # a threshold above every probability rejects all
    path, _ = typical_acceptance(probs, cands, posterior_threshold=1.0, posterior_alpha=10.0)
    assert path == []


def test_engine_uses_it_only_when_asked(monkeypatch):
    import specheads.decoding.engine as engine
    from conftest import cached_verifier
    from specheads import SamplingParams, SpeculativeDecoder
    from specheads.drafters import DraftModelDrafter

    v = cached_verifier("llama")
    calls = []
    real = engine.typical_acceptance
    monkeypatch.setattr(engine, "typical_acceptance", lambda *a, **k: calls.append(1) or real(*a, **k))
    drafter = DraftModelDrafter(v.model, v.vocab_size)
    sampling = SamplingParams(temperature=1.0)
    SpeculativeDecoder(v, drafter, num_draft_tokens=3).generate([3, 4, 5], max_new_tokens=12, sampling=sampling, seed=0, eos_token_ids=[])
    assert calls == []  # default: exact speculative sampling
    out = SpeculativeDecoder(v, drafter, num_draft_tokens=3, typical_acceptance={}).generate(
        [3, 4, 5], max_new_tokens=12, sampling=sampling, seed=0, eos_token_ids=[])
    assert calls and len(out.token_ids) == 12
