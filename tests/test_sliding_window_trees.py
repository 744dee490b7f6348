"""Candidate trees on sliding-window verifiers: Mistral (every layer sliding), Gemma-2 and Gemma-3
(sliding and full layers mixed, one tree mask per layer type), with a window of 16 tokens.

(a) Every node's logits of one tree forward equal a causal forward over its root-to-node path,
with the past inside the window, with the tree crossing the window's edge, and far past it; the
same check fails when a layer type gets another type's mask or the window is not cut. After
``keep_positions`` the cache equals a fresh prefill's and decodes on identically.
(b) Greedy tree decoding is token for token Hugging Face's greedy ``generate``, for sequences that
fit inside the window and sequences that run far past it, with a fixed-shape tree mixing the
verifier's own continuation with wrong branches; the engine's cache at the end equals a fresh
prefill's. (EAGLE-3's dynamic tree on a sliding Gemma-3: tests/test_eagle3.py.)
(c) Sampled tree decoding at T = 1 past the window gives the verifier's exact joint.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import BOS, EOS, PAD, VOCAB, hf_greedy
from specheads.decoding import SpeculativeDecoder
from specheads.decoding import engine as engine_mod
from specheads.decoding.candidates import Candidates, DraftContext
from specheads.decoding.kv_cache import attention_layers, cache_kwargs, keep_positions, new_cache, record_for_rollback
from specheads.decoding.sampling import SamplingParams
from specheads.decoding.tree import path_to_node, tree_attention_mask, tree_position_ids
from specheads.verifier import Verifier

WINDOW = 16
FAMILIES = ("mistral", "gemma2", "gemma3")
IMPLS = {"mistral": ("sdpa", "eager"), "gemma2": ("eager",), "gemma3": ("sdpa", "eager")}  # Gemma-2 has no sdpa


def make_sliding(family: str, *, window: int = WINDOW, vocab: int = VOCAB, hidden: int = 32, layers: int = 4, seed: int = 0,
                 impl: str | None = None, init_range: float = 0.5):
    """A tiny random sliding-window causal LM: Mistral (all layers sliding); Gemma-2 and Gemma-3
    with sliding and full layers mixed."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                  initializer_range=init_range, sliding_window=window, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    mixed = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    elif family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, layer_types=mixed, query_pre_attn_scalar=hidden // 4))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, layer_types=mixed[::-1], query_pre_attn_scalar=hidden // 4))
    else:
        raise ValueError(family)
    if impl is not None:
        model.set_attn_implementation(impl)
    model.eval().requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def sliding_verifier(family: str, impl: str | None = None) -> Verifier:
    return Verifier(model=make_sliding(family, impl=impl), tokenizer=None, name=f"tiny-{family}-window{WINDOW}")


def test_the_families_have_the_layers_they_stand_for():
    kinds = {f: {t for t, _ in attention_layers(sliding_verifier(f).model)} for f in FAMILIES}
    assert kinds == {"mistral": {"sliding_attention"}, "gemma2": {"sliding_attention", "full_attention"},
                     "gemma3": {"sliding_attention", "full_attention"}}
    assert {w for t, w in attention_layers(sliding_verifier("gemma3").model) if t == "sliding_attention"} == {WINDOW}


def test_attention_layers_without_transformers_layer_types_helper(monkeypatch):
    """On a transformers without ``cache_utils.get_layer_types_and_kwargs`` the config is read alike."""
    import transformers.cache_utils
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from conftest import cached_verifier

    llama4 = Llama4ForCausalLM(Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                attention_chunk_size=16))
    models = [sliding_verifier(f).model for f in FAMILIES] + [cached_verifier(a).model for a in ("llama", "gpt2")] + [llama4]
    expected = [attention_layers(m) for m in models]
    assert ("chunked_attention", 16) in expected[-1] and ("full_attention", None) in expected[-1]
    monkeypatch.delattr(transformers.cache_utils, "get_layer_types_and_kwargs")
    assert [attention_layers(m) for m in models] == expected


# --------------------------------------------------------------------------------------------
# (a) one tree forward equals causal forwards over each root-to-node path

#   root -> 0 -> 2 -> 5 -> 7      depth 4: rows at past_len + 4
#             -> 3
#        -> 1 -> 4
#        -> 8
#   2 -> 6
TREE = [-1, -1, 0, 0, 1, 2, 2, 5, -1]
# past lengths: tree inside the window, tree crossing the window's edge, past far beyond it
PASTS = {"inside": 5, "crossing": WINDOW - 2, "past": 2 * WINDOW + 3}


def _tree_forward(model, decoder, past, pending, toks, masks=None):
    """Logits of every row of a tree step on a cache prefilled with ``past``, as the engine runs it."""
    cache = new_cache(model)
    kw = cache_kwargs(model, cache)
    model(input_ids=torch.tensor([past]), **kw, use_cache=True)
    record_for_rollback(cache)
    parents = torch.tensor(TREE)
    if masks is None:
        masks = decoder._tree_masks(parents, len(past), cache, torch.float32, torch.device("cpu"))
    out = model(input_ids=torch.tensor([[pending] + toks]), attention_mask=masks,
                position_ids=tree_position_ids(parents, len(past)), **kw, use_cache=True)
    return out.logits[0], cache, masks


def _max_error(logits, reference) -> float:
    return max(float((logits[i + 1] - reference[i]).abs().max()) for i in range(-1, len(TREE)))


@pytest.mark.parametrize("where", list(PASTS))
@pytest.mark.parametrize("family, impl", [(f, i) for f in FAMILIES for i in IMPLS[f]])
def test_tree_forward_matches_causal_paths(family, impl, where):
    verifier = sliding_verifier(family, impl)
    model = verifier.model
    decoder = SpeculativeDecoder(verifier, None)
    gen = torch.Generator().manual_seed(len(family) + PASTS[where])
    seq = torch.randint(3, VOCAB, (PASTS[where] + 1 + len(TREE),), generator=gen).tolist()
    past, pending, toks = seq[: PASTS[where]], seq[PASTS[where]], seq[PASTS[where] + 1 :]
    with torch.no_grad():
        reference = {i: model(input_ids=torch.tensor([past + [pending] + [toks[j] for j in path_to_node(TREE, i)]])).logits[0, -1]
                     for i in range(-1, len(TREE))}
        logits, cache, masks = _tree_forward(model, decoder, past, pending, toks)
        assert _max_error(logits, reference) < 1e-4, where
        if where != "inside":
            # Power: sliding layers whose mask is not cut to the window see what they must not.
            def uncut(mask):
                kv_offset = len(past) - (mask.shape[-1] - mask.shape[-2])
                return tree_attention_mask(TREE, len(past), kv_offset=kv_offset)

            wrong = {k: uncut(m) if k == "sliding_attention" else m for k, m in masks.items()} if isinstance(masks, dict) else uncut(masks)
            assert _max_error(_tree_forward(model, decoder, past, pending, toks, wrong)[0], reference) > 1e-2
        if isinstance(masks, dict) and where == "crossing":
            # Power: each layer type given the other type's mask (same shape before the window fills).
            assert masks["full_attention"].shape == masks["sliding_attention"].shape
            assert not torch.equal(masks["full_attention"], masks["sliding_attention"])
            for kind in masks:
                other = next(k for k in masks if k != kind)
                swapped = {**masks, kind: masks[other]}
                assert _max_error(_tree_forward(model, decoder, past, pending, toks, swapped)[0], reference) > 1e-2, kind
        # Keep a path through a later branch: the cache is a fresh prefill's, and decodes on alike.
        path = path_to_node(TREE, 6)
        keep_positions(cache, len(past), [0] + [i + 1 for i in path])
        kept = past + [pending] + [toks[i] for i in path]
        fresh = new_cache(model)
        model(input_ids=torch.tensor([kept]), **cache_kwargs(model, fresh), use_cache=True)
        assert cache.get_seq_length() == fresh.get_seq_length() == len(kept)
        for i, (mine, theirs) in enumerate(zip(cache.layers, fresh.layers)):
            assert mine.keys.shape == theirs.keys.shape, (i, mine.keys.shape, theirs.keys.shape)
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)
        nxt = [7, 8, 9]
        a = model(input_ids=torch.tensor([nxt]), **cache_kwargs(model, cache), use_cache=True).logits[0]
        b = model(input_ids=torch.tensor([kept + nxt])).logits[0, -3:]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# (b) greedy decoding with trees equals Hugging Face greedy generate


def greedy_chain(model, tokens: list[int], k: int) -> list[int]:
    seq = list(tokens)
    with torch.no_grad():
        for _ in range(k):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(tokens):]


class FixedTreeDrafter:
    """One fixed tree shape of depth 3 around the verifier's own greedy continuation s0 s1 s2:

        root -> w0 -> x
             -> s0 -> s1 -> w2
                         -> s2
                   -> w1
             -> w0'

    with s1 or s2 replaced by a wrong token on two context lengths in three, so accepted paths
    end at depth 1, 2 and 3 and always run through a later branch (rows that are not a prefix)."""

    name = "fixed_tree"
    needs_hidden_states = False
    proposes_trees = True

    def __init__(self, model):
        self.model = model
        self.steps: list[tuple[int, int]] = []  # (context length, accepted) per step

    def start(self, prompt_ids):
        pass

    def propose(self, ctx: DraftContext) -> Candidates:
        s = greedy_chain(self.model, ctx.tokens, 3)
        wrong_at = len(ctx.tokens) % 3
        if wrong_at:
            s[wrong_at] = (s[wrong_at] + 7) % VOCAB
        w = [(t + 1) % VOCAB for t in s]
        tokens = [w[0], s[0], (w[0] + 1) % VOCAB, (s[1] + 3) % VOCAB, s[1], w[1], w[2], s[2]]
        parents = [-1, -1, -1, 0, 1, 1, 4, 4]
        self.steps.append((len(ctx.tokens), -1))
        return Candidates(torch.tensor(tokens), torch.tensor(parents))

    def observe(self, num_accepted, emitted):
        self.steps[-1] = (self.steps[-1][0], num_accepted)


PROMPTS = ((5, 9, 13, 7), (20, 21, 22, 23, 20), (7, 30, 7, 31, 7, 30))
# new tokens: inside, the longest prompt, the new tokens and the deepest draft fit the window
RUNS = {"inside": WINDOW - max(map(len, PROMPTS)) - 3, "past": 3 * WINDOW}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_trees_match_hf(family, run, monkeypatch):
    verifier = sliding_verifier(family)
    caches = []

    def capturing_new_cache(model):
        cache = new_cache(model)
        caches.append(cache)
        return cache

    monkeypatch.setattr(engine_mod, "new_cache", capturing_new_cache)
    n_new = RUNS[run]
    accepted = {1: 0, 2: 0, 3: 0}
    past_the_window = 0
    for prompt in PROMPTS:
        drafter = FixedTreeDrafter(verifier.model)
        out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=3, control="fixed").generate(list(prompt), max_new_tokens=n_new, eos_token_ids=[])
        assert out.token_ids == hf_greedy(verifier.model, list(prompt), n_new, None), prompt
        if run == "inside":
            assert len(prompt) + n_new + 3 <= WINDOW
        for context, n_acc in drafter.steps:
            accepted[n_acc] = accepted.get(n_acc, 0) + 1
            past_the_window += context > WINDOW + 3
        # The engine's cache holds every token but the pending one, as a fresh prefill's would.
        fresh = new_cache(verifier.model)
        verifier.model(input_ids=torch.tensor([list(prompt) + out.token_ids[:-1]]), **cache_kwargs(verifier.model, fresh), use_cache=True)
        for mine, theirs in zip(caches[-1].layers, fresh.layers):
            assert mine.keys.shape == theirs.keys.shape
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
    assert accepted[1] and accepted[2] and accepted[3], accepted  # paths ended at every depth
    assert (past_the_window > 10) == (run == "past"), past_the_window


def test_trees_are_no_longer_refused_and_chains_run_past_the_window():
    """A tree drafter on a sliding-window verifier is accepted at setup; a chain drafter whose drafts
    are rejected past the window (a cache crop there) is lossless too."""
    from conftest import cached_verifier
    from specheads.drafters import DraftModelDrafter

    verifier = sliding_verifier("mistral")
    assert SpeculativeDecoder(verifier, FixedTreeDrafter(verifier.model))._no_trees is None
    drafter = DraftModelDrafter(cached_verifier("llama").model, VOCAB)  # another model: mostly wrong
    prompt = list(PROMPTS[0])
    out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=3, control="fixed").generate(prompt, max_new_tokens=2 * WINDOW, eos_token_ids=[])
    assert out.token_ids == hf_greedy(verifier.model, prompt, 2 * WINDOW, None)
    assert sum(out.stats.accepted_at) < sum(out.stats.drafted_at)


# --------------------------------------------------------------------------------------------
# (c) sampled trees past the window: the verifier's exact joint

E2E_VOCAB = 8
E2E_WINDOW = 3
E2E_PROMPT = [3, 5, 6, 1]  # longer than the window: every tree step is past it
E2E_RUNS = 1200


@functools.lru_cache(maxsize=None)
def e2e_verifier() -> Verifier:
    model = make_sliding("gemma3", window=E2E_WINDOW, vocab=E2E_VOCAB, hidden=16, layers=2, init_range=0.3)
    return Verifier(model=model, tokenizer=None, name="tiny-gemma3-window3")


def test_sampled_trees_past_the_window_match_the_verifier_distribution():
    from test_sampling import PASS, REJECT, chisquare_pvalue, exact_joint
    from test_tree import SampledTreeDrafter

    verifier = e2e_verifier()
    decoder = SpeculativeDecoder(verifier, SampledTreeDrafter(deterministic=False), num_draft_tokens=2, control="fixed")
    sampling = SamplingParams(temperature=1.0)
    counts = torch.zeros((E2E_VOCAB,) * 3)
    accepted = torch.zeros(2)
    for seed in range(E2E_RUNS):
        out = decoder.generate(E2E_PROMPT, max_new_tokens=4, sampling=sampling, seed=seed, eos_token_ids=[])
        counts[tuple(out.token_ids[:3])] += 1
        accepted[: len(out.stats.accepted_at)] += torch.tensor(out.stats.accepted_at[:2], dtype=torch.float)
    assert accepted[0] > 0.2 * E2E_RUNS and accepted[1] > 0.02 * E2E_RUNS, accepted
    with torch.no_grad():
        p = exact_joint(verifier.model, E2E_PROMPT)
        other = exact_joint(make_sliding("gemma3", window=E2E_WINDOW, vocab=E2E_VOCAB, hidden=16, layers=2, init_range=0.3, seed=1), E2E_PROMPT)
    assert chisquare_pvalue(counts, p) > PASS
    assert chisquare_pvalue(counts.sum(0), p.sum(0)) > PASS  # (x2, x3): the tree step's tokens
    # Power: the counts are rejected against another model's joint.
    assert chisquare_pvalue(counts, other) < REJECT
