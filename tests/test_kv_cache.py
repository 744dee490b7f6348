"""KV-cache rollback: after rejected drafts are cropped, a cache equals a fresh prefill's.

Covers ``truncate_cache`` on a transformers DynamicCache directly, the engine's own verifier cache
after a run with rejections, and the draft model's cache resynchronisation between steps.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, cached_verifier, noisy_model
from specheads.decoding import SpeculativeDecoder
from specheads.decoding import engine as engine_mod
from specheads.decoding.candidates import DraftContext
from specheads.decoding.kv_cache import cache_kwargs, new_cache, truncate_cache
from specheads.decoding.sampling import SamplingParams
from specheads.drafters import DraftModelDrafter

PROMPT = [5, 9, 13, 5, 9, 13, 5, 9, 20, 21]


@torch.inference_mode()
def prefill(model, tokens, cache=None):
    cache = new_cache(model) if cache is None else cache
    out = model(input_ids=torch.tensor([tokens]), **cache_kwargs(model, cache), use_cache=True)
    return cache, out.logits[0]


def assert_cache_equal(a, b, atol=1e-5):
    assert a.get_seq_length() == b.get_seq_length()
    assert len(a.layers) == len(b.layers)
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        assert la.keys.shape == lb.keys.shape, (i, la.keys.shape, lb.keys.shape)
        assert la.values.shape == lb.values.shape, (i, la.values.shape, lb.values.shape)
        assert torch.allclose(la.keys, lb.keys, atol=atol), f"layer {i} keys differ by {(la.keys - lb.keys).abs().max()}"
        assert torch.allclose(la.values, lb.values, atol=atol), f"layer {i} values differ by {(la.values - lb.values).abs().max()}"


@pytest.mark.parametrize("n_accepted", [0, 2, 5])
def test_truncate_after_rejection_equals_fresh_prefill(verifier, n_accepted):
    model = verifier.model
    pending, drafts = 33, [40, 41, 42, 43, 44]
    cache, _ = prefill(model, PROMPT)
    # A verify step: the pending token plus 5 drafts, of which the first n_accepted are kept.
    prefill(model, [pending] + drafts, cache)
    assert cache.get_seq_length() == len(PROMPT) + 1 + len(drafts)
    keep = PROMPT + [pending] + drafts[:n_accepted]
    truncate_cache(cache, len(keep))
    assert cache.get_seq_length() == len(keep)
    fresh, _ = prefill(model, keep)
    assert_cache_equal(cache, fresh)
    # And decoding continues from the cropped cache exactly as from the fresh one.
    _, logits_a = prefill(model, [7, 8], cache)
    _, logits_b = prefill(model, [7, 8], fresh)
    _, logits_full = prefill(model, keep + [7, 8])
    assert torch.allclose(logits_a, logits_b, atol=1e-5)
    assert torch.allclose(logits_a, logits_full[-2:], atol=1e-4)


def test_truncate_edge_cases(verifier):
    model = verifier.model
    cache, _ = prefill(model, PROMPT)
    fresh, _ = prefill(model, PROMPT)
    truncate_cache(cache, len(PROMPT))  # same length: a no-op
    assert_cache_equal(cache, fresh)
    with pytest.raises(ValueError, match=str(len(PROMPT) + 1)):
        truncate_cache(cache, len(PROMPT) + 1)
    truncate_cache(cache, 1)
    assert_cache_equal(cache, prefill(model, PROMPT[:1])[0])
    truncate_cache(cache, 0)
    assert cache.get_seq_length() == 0
    # An emptied cache takes a new prompt like a fresh one.
    prefill(model, PROMPT[3:], cache)
    assert_cache_equal(cache, prefill(model, PROMPT[3:])[0])


def test_engine_cache_after_rejections_equals_fresh_prefill(arch, verifier, monkeypatch):
    """The engine's verifier cache at the end of a run with rejections holds exactly the keys and
    values of every token but the pending last one."""
    caches = []

    def capturing_new_cache(model):
        cache = new_cache(model)
        if model is verifier.model:
            caches.append(cache)
        return cache

    monkeypatch.setattr(engine_mod, "new_cache", capturing_new_cache)
    drafter = DraftModelDrafter(noisy_model(arch), VOCAB)
    out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=4, control="fixed").generate(PROMPT, max_new_tokens=30, eos_token_ids=[])
    assert sum(out.stats.accepted_at) < sum(out.stats.drafted_at)  # there were rejections
    assert sum(out.stats.accepted_at) > 0  # and acceptances
    assert len(caches) == 1
    all_tokens = PROMPT + out.token_ids
    fresh, _ = prefill(verifier.model, all_tokens[:-1])
    assert_cache_equal(caches[0], fresh)


# --------------------------------------------------------------------------------------------
# The draft model's own cache


def _ctx(tokens, k, sampling=SamplingParams(), seed=None):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return DraftContext(list(tokens), k, sampling, gen)


def _fresh_proposal(model, prompt, tokens, k, sampling=SamplingParams(), seed=None):
    d = DraftModelDrafter(model, VOCAB)
    d.start(prompt)
    return d, d.propose(_ctx(tokens, k, sampling, seed))


@pytest.mark.parametrize("n_accepted", [0, 1, 3, 4])
def test_draft_model_resyncs_after_partial_acceptance(arch, n_accepted):
    model = cached_verifier(arch, 1).model  # any model with the vocabulary will do
    k = 4
    drafter = DraftModelDrafter(model, VOCAB)
    drafter.start(PROMPT)
    tokens = PROMPT + [33]
    first = drafter.propose(_ctx(tokens, k)).tokens.tolist()
    assert len(first) == k
    # The verifier kept n_accepted drafts, then emitted its own token (a different one on rejection).
    if n_accepted < k:
        own = (first[n_accepted] + 1) % VOCAB
    else:
        own = 17  # the bonus token
    tokens2 = tokens + first[:n_accepted] + [own]
    drafter.observe(n_accepted, first[:n_accepted] + [own])
    second = drafter.propose(_ctx(tokens2, k))
    fresh_drafter, fresh = _fresh_proposal(model, PROMPT, tokens2, k)
    assert second.tokens.tolist() == fresh.tokens.tolist()
    assert second.draft_probs is None and fresh.draft_probs is None  # greedy drafting is deterministic
    # The caches hold the same positions with the same keys and values.
    assert_cache_equal(drafter._cache, fresh_drafter._cache)
    # A third step after another partial acceptance, and a context that shrank below the cache
    # (a new request reusing the drafter without start()), still resync.
    tokens3 = tokens2 + second.tokens.tolist()[:1] + [2]
    third = drafter.propose(_ctx(tokens3, k)).tokens.tolist()
    assert third == _fresh_proposal(model, PROMPT, tokens3, k)[1].tokens.tolist()
    shorter = PROMPT[:6] + [11]
    assert drafter.propose(_ctx(shorter, k)).tokens.tolist() == _fresh_proposal(model, PROMPT, shorter, k)[1].tokens.tolist()


def test_draft_model_resync_when_sampling(arch):
    """With sampling, the resynced drafter draws the same tokens from the same q as a fresh one."""
    model = cached_verifier(arch, 1).model
    sampling = SamplingParams(temperature=1.0)
    k = 3
    drafter = DraftModelDrafter(model, VOCAB)
    drafter.start(PROMPT)
    tokens = PROMPT + [33]
    first = drafter.propose(_ctx(tokens, k, sampling, seed=0))
    assert first.draft_probs is not None and first.draft_probs.shape == (k, VOCAB)
    assert torch.allclose(first.draft_probs.sum(-1), torch.ones(k), atol=1e-5)
    tokens2 = tokens + first.tokens.tolist()[:1] + [(first.tokens[1].item() + 1) % VOCAB]
    second = drafter.propose(_ctx(tokens2, k, sampling, seed=5))
    _, fresh = _fresh_proposal(model, PROMPT, tokens2, k, sampling, seed=5)
    assert second.tokens.tolist() == fresh.tokens.tolist()
    assert torch.allclose(second.draft_probs, fresh.draft_probs, atol=1e-5)


def test_draft_vocabulary_scores_only_its_tokens(arch):
    """With a draft vocabulary the drafter's logits are the model's own on those ids (-inf elsewhere),
    the cache stays in step with a full-vocabulary drafter, and bad vocabularies are refused."""
    from specheads.errors import SpecHeadsError

    model = noisy_model(arch)
    ids = [i for i in range(VOCAB) if i % 4]
    prompt = [5, 9, 13, 2, 7]
    cut, full = DraftModelDrafter(model, VOCAB, draft_vocab=ids), DraftModelDrafter(model, VOCAB)
    for d in (cut, full):
        d.start(prompt)
    a, b = cut._forward(prompt), full._forward(prompt)
    torch.testing.assert_close(a[ids], b[ids], rtol=1e-4, atol=1e-4)
    assert torch.isinf(a[[i for i in range(VOCAB) if i % 4 == 0]]).all()
    proposal = cut.propose(_ctx(prompt, 4))
    assert len(proposal) == 4 and all(int(t) % 4 for t in proposal.tokens), proposal.tokens
    assert int(proposal.tokens[0]) == ids[int(b[ids].argmax())]  # greedy: the most probable token of the draft vocabulary
    with pytest.raises(SpecHeadsError, match="distinct token ids"):
        DraftModelDrafter(model, VOCAB, draft_vocab=[1, 1, 2])
    with pytest.raises(SpecHeadsError, match="distinct token ids"):
        DraftModelDrafter(model, VOCAB, draft_vocab=[1, VOCAB])


def test_draft_vocabulary_refused_for_models_that_change_logits_after_the_head():
    from specheads.errors import SpecHeadsError

    model = copy.deepcopy(noisy_model("llama"))
    forward = model.forward

    def scaled(*args, **kwargs):  # like a model with a logit scale or soft-capping after its LM head
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    with pytest.raises(SpecHeadsError, match="transforms its logits after the LM head"):
        DraftModelDrafter(model, VOCAB, draft_vocab=list(range(10)))
