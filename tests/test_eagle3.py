"""EAGLE-3: training-time test matches drafting, decoding is lossless on several verifier
families, training raises acceptance, checkpoints round-trip and bad input is refused."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import EOS, REPETITIVE_PROMPTS, VOCAB, cached_verifier, greedy_reference, hf_greedy
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.candidates import DraftContext
from specheads.decoding.sampling import SamplingParams
from specheads.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model, draft_vocab_d2t, load_eagle3_model, save_eagle3
from specheads.errors import SpecHeadsError
from specheads.verifier import Verifier


def tiny_family(family: str, seed: int = 0) -> Verifier:
    """Tiny random verifiers of families beyond conftest's: Qwen3, and Gemma-3 with sliding-window
    and full layers mixed."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.5,
                  bos_token_id=0, eos_token_id=EOS, pad_token_id=2)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif family == "gemma3":
        # a window of 16: the test sequences start inside it and run far past it
        types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=16, layer_types=types, query_pre_attn_scalar=8))
    else:
        raise ValueError(family)
    model.eval().requires_grad_(False)
    return Verifier(model=model, tokenizer=None, name=f"tiny-{family}")


@functools.lru_cache(maxsize=None)
def family_verifier(family: str) -> Verifier:
    if family in ("llama", "qwen2", "gpt2"):
        return cached_verifier(family)
    if family in ("mistral", "gemma2"):  # every layer sliding; sliding and full mixed (window 16)
        from test_sliding_window_trees import sliding_verifier

        return sliding_verifier(family)
    return tiny_family(family)


def random_drafter_model(verifier, draft_vocab=None, seed=0, aux=None) -> Eagle3Model:
    ids = torch.tensor(draft_vocab if draft_vocab is not None else range(verifier.vocab_size))
    n_layers = verifier.config.get_text_config().num_hidden_layers if hasattr(verifier.config, "get_text_config") else 2
    cfg = Eagle3Config.from_verifier(verifier, len(ids), aux or [1, n_layers // 2 or 1, n_layers])
    torch.manual_seed(seed)
    return Eagle3Model(cfg, d2t=draft_vocab_d2t(ids))


def test_ttt_forward_equals_drafting_rows():
    """Step i of training-time test at index t computes exactly the draft row at depth i that
    drafting from real row t produces, given the same (ground-truth) tokens."""
    v = cached_verifier("llama")
    model = random_drafter_model(v)
    ids = torch.tensor([[5, 9, 13, 7, 30, 22, 11, 40, 3, 17, 8, 50]])
    with torch.no_grad():
        out = v.model(input_ids=ids, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in model.config.aux_layer_ids], -1)
        ttt = model.ttt_forward(aux, ids, v.model.get_input_embeddings(), steps=3)
    drafter = Eagle3Drafter(model, v, tree="chain")
    t = 6
    with torch.no_grad():
        real = drafter._run(model.fuse(aux[0, : t + 1]), ids[0, 1 : t + 2].tolist(), list(range(t + 1)), None)
        torch.testing.assert_close(real[-1], ttt[0][0, t], rtol=1e-4, atol=1e-5)
        h = real[-1]
        for i in (1, 2):
            h = drafter._run(h[None], [int(ids[0, t + 1 + i])], [t + i], None)[0]
            torch.testing.assert_close(h, ttt[i][0, t], rtol=1e-4, atol=1e-5)


FAMILIES = ("llama", "qwen2", "gpt2", "qwen3", "gemma3", "mistral", "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tree", ["chain", 6])
def test_greedy_lossless_families(family, tree):
    v = family_verifier(family)
    drafter = Eagle3Drafter(trained_model(family), v, tree=tree, top_k=3)
    engine = SpeculativeDecoder(v, drafter, num_draft_tokens=4, control="fixed")
    accepted = 0
    # 30 new tokens run far past the sliding window (16) of Gemma-3, Mistral and Gemma-2; 4 stay
    # inside it with the prompt and the drafts. A prompt the drafter was fitted on: long paths kept.
    runs = [(p, 30) for p in REPETITIVE_PROMPTS + (tuple(TRAIN_PROMPTS[0]),)] + [(REPETITIVE_PROMPTS[0], 4)]
    for prompt, n_new in runs:
        out = engine.generate(list(prompt), max_new_tokens=n_new, eos_token_ids=[EOS])
        assert out.token_ids == hf_greedy(v.model, list(prompt), n_new, EOS)
        accepted += sum(out.stats.accepted_at)
    assert accepted > 0  # the drafts were really tried and some kept, not an engine running plain


TRAIN_PROMPTS = torch.randint(3, VOCAB, (16, 4), generator=torch.Generator().manual_seed(0)).tolist()


@functools.lru_cache(maxsize=None)
def trained_model(family: str) -> Eagle3Model:
    """An EAGLE-3 drafter fitted for a few hundred steps to the tiny verifier's greedy continuations."""
    from types import SimpleNamespace

    from specheads.training.objectives.eagle3 import Eagle3Objective

    v = family_verifier(family)
    n_layers = v.config.get_text_config().num_hidden_layers if hasattr(v.config, "get_text_config") else 2
    drafter_cfg = SimpleNamespace(aux_layer_ids=[1, max(1, n_layers // 2), n_layers], num_layers=1)
    obj = Eagle3Objective(v, drafter_cfg, SimpleNamespace(ttt_steps=3, ttt_decay=0.8), torch.arange(VOCAB))
    prompts = torch.tensor(TRAIN_PROMPTS)
    rows = [prompts[i].tolist() + hf_greedy(v.model, prompts[i].tolist(), 28, None) for i in range(16)]
    batch = {"input_ids": torch.tensor(rows), "attention_mask": torch.ones(16, 32, dtype=torch.long)}
    batch["answer_mask"] = batch["attention_mask"].clone()
    batch["answer_mask"][:, :4] = 0
    torch.manual_seed(0)
    opt = torch.optim.AdamW(obj.module.parameters(), lr=3e-3)
    obj.module.train()
    for _ in range(150):
        loss, _ = obj.loss(obj.module, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    obj.module.eval()
    return obj.module


def test_training_raises_acceptance():
    """Fitted to the verifier's continuations of some prompts, the drafter's drafts for those
    prompts are accepted far more often than a random drafter's: what training measured is what
    decoding gets (the tiny random verifier has no structure to generalise from)."""
    v = cached_verifier("llama")

    def tau(model):
        engine = SpeculativeDecoder(v, Eagle3Drafter(model, v, tree="chain"), num_draft_tokens=4, control="fixed")
        emitted = steps = 0
        for prompt in TRAIN_PROMPTS[:6]:
            out = engine.generate(list(prompt), max_new_tokens=28, eos_token_ids=[])
            emitted += out.stats.emitted_in_steps
            steps += out.stats.verify_steps
        return emitted / steps

    n_layers = 2
    random_tau = tau(random_drafter_model(v, aux=[1, 1, n_layers]))
    trained_tau = tau(trained_model("llama"))
    assert trained_tau > random_tau + 0.5, (random_tau, trained_tau)


def test_checkpoint_roundtrip_and_verifier_check(tmp_path):
    v = cached_verifier("llama")
    model = random_drafter_model(v, draft_vocab=list(range(0, VOCAB, 2)))
    save_eagle3(tmp_path / "d", model, v, training={"steps": 1})
    back = load_eagle3_model(tmp_path / "d", v)
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    other = cached_verifier("llama", 1)
    with pytest.raises(SpecHeadsError, match="LM head hash"):
        load_eagle3_model(tmp_path / "d", other)


def test_draft_vocabulary_stays_lossless_and_inside():
    v = cached_verifier("qwen2")
    vocab = [i for i in range(VOCAB) if i % 3]
    drafter = Eagle3Drafter(random_drafter_model(v, draft_vocab=vocab), v, tree=5, top_k=2)
    engine = SpeculativeDecoder(v, drafter, num_draft_tokens=3, control="fixed")
    prompt = list(REPETITIVE_PROMPTS[0])
    assert engine.generate(prompt, max_new_tokens=25, eos_token_ids=[EOS]).token_ids == list(greedy_reference("qwen2", tuple(prompt), 25, EOS))
    drafter.start(prompt)
    with torch.no_grad():
        out = v.model(input_ids=torch.tensor([prompt + [4]]), output_hidden_states=True)
    hidden = tuple(out.hidden_states[i][0, :-1] for i in drafter.hidden_layers)
    cands = drafter.propose(DraftContext(prompt + [4], 3, SamplingParams(), None, hidden))
    assert set(cands.tokens.tolist()) <= set(vocab)
    assert len(cands) <= 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"aux_layer_ids": [0, 1, 2]}, r"aux_layer_ids \[0\]"),
        ({"aux_layer_ids": [1, 2, 9]}, r"aux_layer_ids \[9\]"),
        ({"draft_vocab_size": VOCAB + 1}, f"draft_vocab_size={VOCAB + 1}"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    v = cached_verifier("llama")
    with pytest.raises(SpecHeadsError, match=match):
        Eagle3Config.from_verifier(v, kwargs.get("draft_vocab_size", VOCAB), kwargs.get("aux_layer_ids", [1, 1, 2]))


def test_tree_budget_below_one_is_refused():
    v = cached_verifier("llama")
    with pytest.raises(SpecHeadsError, match="tree budget 0"):
        Eagle3Drafter(random_drafter_model(v), v, tree="dyn0")


