"""Mixture-of-experts verifiers: Qwen3-MoE and gpt-oss as transformers ships them (tiny random
float32 twins, 4 layers, 4 experts with top-2 routing; gpt-oss alternates sliding-window (16
tokens) and full layers, has attention sinks and YaRN rope; both have heads x head_dim twice the
hidden size, as the real ones do).

(a) The EAGLE-3 drafter built for them is a valid Llama layer: shapes from the verifier's config,
default aux layers inside a shallow verifier, and a rope that rotates exactly as the verifier's
(at the tiny twins and at the real Qwen3-30B-A3B / gpt-oss-20b configs, built on the meta device).
(b) Greedy decoding is token for token transformers' greedy ``generate`` with every drafter kind
(n-gram, the verifier as its own draft model, a noisy copy, Medusa trees, EAGLE-3 chains and
dynamic trees, goodput control), far past gpt-oss's window; one tree forward gives each node the
logits of a causal forward over its path, and the engine's cache ends equal to a fresh prefill's. A config that asks for router logits changes nothing.
(c) Self-distillation through ``generate`` runs on both, answers as unbatched greedy does, and
the features it captures equal the verifier's own ``output_hidden_states`` forward.
(d) EAGLE-3 trains through the real loop on both, saves, loads and decodes losslessly.
"""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch

from conftest import EOS, MOE_ARCHS, MOE_WINDOW, VOCAB, hf_greedy, make_model, make_verifier, moe_verifier, noisy_copy, random_medusa_heads
from specheads.decoding import SpeculativeDecoder
from specheads.decoding import engine as engine_mod
from specheads.decoding.kv_cache import attention_layers, cache_kwargs, new_cache
from specheads.drafters import DraftModelDrafter, NgramDrafter
from specheads.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model, draft_vocab_d2t, init_from_verifier, vllm_config
from specheads.verifier import Verifier

LAYERS = 4
HEAD_DIM = 16  # 2 * hidden // heads
# ~10 prompt tokens + 40 new: every run goes far past gpt-oss's window of 16
PROMPTS = ((5, 9, 13, 5, 9, 13, 5, 9), (20, 21, 22, 23, 20, 21, 22, 23, 20, 21), (7, 30, 7, 31, 7, 30, 7, 31, 7, 30, 7))
N_NEW = 40


@functools.lru_cache(maxsize=None)
def reference(arch: str, prompt: tuple[int, ...], n: int = N_NEW) -> tuple[int, ...]:
    return tuple(hf_greedy(moe_verifier(arch).model, list(prompt), n, EOS))


# --------------------------------------------------------------------------------------------
# (a) the twins, and the EAGLE-3 drafter built for them


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_twins_have_the_parts_they_stand_for(arch):
    model = moe_verifier(arch).model
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(PROMPTS[1])]), output_router_logits=True)
    # one router per layer over 4 experts; the tokens do not all go to the same two experts
    assert len(out.router_logits) == LAYERS and all(r.shape == (len(PROMPTS[1]), 4) for r in out.router_logits)
    chosen = {tuple(sorted(row.topk(2).indices.tolist())) for r in out.router_logits for row in r}
    assert len(chosen) >= 3, chosen
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    cfg = model.config
    assert cfg.head_dim * cfg.num_attention_heads == 2 * cfg.hidden_size
    if arch == "gpt_oss":
        assert attention_layers(model) == [("sliding_attention", MOE_WINDOW), ("full_attention", None)] * 2
        assert cfg.rope_parameters["rope_type"] == "yarn" and model.model.rotary_emb.attention_scaling > 1.0
        assert all(layer.self_attn.sinks.abs().min() > 0 for layer in model.model.layers)  # attention sinks in use
        assert cfg._attn_implementation == "eager"  # gpt-oss has no sdpa: trees run on eager
    else:
        assert attention_layers(model) == [("full_attention", None)] * LAYERS


def _rotations_match(verifier_model, drafter_model: Eagle3Model) -> None:
    """The drafter's rope rotates a query exactly as the verifier's own rotary code does."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotate

    verifier_rotate = sys.modules[type(verifier_model).__module__].apply_rotary_pos_emb
    positions = torch.tensor([[0, 1, 5, 17, 40, 200]])
    q = torch.randn(1, drafter_model.config.num_attention_heads, positions.shape[1], drafter_model.config.head_dim,
                    generator=torch.Generator().manual_seed(0))
    cos_v, sin_v = verifier_model.model.rotary_emb(q, positions)
    cos_d, sin_d = drafter_model.rope(q, positions)
    mine, _ = llama_rotate(q, q, cos_d, sin_d)
    theirs, _ = verifier_rotate(q, q, cos_v, sin_v)
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(mine, q)  # positions > 0 really rotate


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_eagle3_drafter_follows_the_verifier_shapes_and_rope(arch):
    v = moe_verifier(arch)
    cfg = Eagle3Config.from_verifier(v, VOCAB)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 4, 2, HEAD_DIM)
    assert cfg.aux_layer_ids == [1, 2]  # vLLM's 2, N // 2, N - 3 kept inside 1..N-1 of a 4-layer verifier
    assert cfg.rope_parameters == {k: val for k, val in v.config.rope_parameters.items() if val is not None}
    model = Eagle3Model(cfg, d2t=draft_vocab_d2t(torch.arange(VOCAB)))
    rotary = v.model.model.rotary_emb
    torch.testing.assert_close(model.rotary.inv_freq, rotary.inv_freq)
    assert model.rotary.attention_scaling == pytest.approx(rotary.attention_scaling)
    _rotations_match(v.model, model)
    # the export vLLM reads carries the same rope
    assert vllm_config(cfg)["rope_parameters"] == cfg.rope_parameters and vllm_config(cfg)["head_dim"] == HEAD_DIM
    # shallower still: 2 layers default to the one aux id 1; 3 layers to 1 and 2
    for layers, aux in ((2, [1]), (3, [1, 2])):
        shallow = Verifier(model=make_model(arch, layers=layers), tokenizer=None, name=f"tiny-{arch}-{layers}")
        assert Eagle3Config.from_verifier(shallow, VOCAB).aux_layer_ids == aux


def real_config(name: str):
    """The published configs' shapes (Qwen/Qwen3-30B-A3B, openai/gpt-oss-20b config.json)."""
    from transformers import GptOssConfig, Qwen3MoeConfig

    if name == "Qwen/Qwen3-30B-A3B":
        return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                              num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                              num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6)
    return GptOssConfig(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_local_experts=32,
                        num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
                        max_position_embeddings=131072)  # gpt-oss's YaRN (factor 32 over 4096) is GptOssConfig's default


@pytest.mark.parametrize("name, head_dim, aux", [("Qwen/Qwen3-30B-A3B", 128, [2, 24, 45]), ("openai/gpt-oss-20b", 64, [2, 12, 21])])
def test_eagle3_drafter_for_the_real_configs(name, head_dim, aux):
    """Built on the meta device (no weights): the drafter config of the real verifiers, and a rope
    (computed from the config alone) equal to the verifier's."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = real_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    v = Verifier(model=model, tokenizer=None, name=name)
    cfg = Eagle3Config.from_verifier(v, 32000)
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads)
    assert cfg.aux_layer_ids == aux and cfg.intermediate_size == config.intermediate_size
    rotary = type(model.model.rotary_emb)(config)  # on the CPU, from the config
    mine = LlamaRotaryEmbedding(cfg.llama_config())
    torch.testing.assert_close(mine.inv_freq, rotary.inv_freq)
    assert mine.attention_scaling == pytest.approx(rotary.attention_scaling)
    if name.startswith("openai"):
        rope = vllm_config(cfg)["rope_parameters"]
        assert rope["rope_type"] == "yarn" and rope["factor"] == 32.0 and rope["original_max_position_embeddings"] == 4096
        assert rotary.attention_scaling > 1.0


# --------------------------------------------------------------------------------------------
# (b) greedy decoding is lossless with every drafter kind


@pytest.mark.parametrize("where", ["inside", "past"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_one_tree_forward_equals_causal_forwards_over_each_path(arch, where):
    """Every node's logits of one tree verify forward (tree masks per layer type, routed experts,
    gpt-oss's sinks) equal a causal forward over its root-to-node path, with the past inside
    gpt-oss's window and far past it; after keeping a later branch the cache equals a fresh
    prefill's."""
    from test_sliding_window_trees import TREE, _max_error, _tree_forward

    from specheads.decoding.kv_cache import keep_positions
    from specheads.decoding.tree import path_to_node

    model = moe_verifier(arch).model
    past_len = 5 if where == "inside" else 2 * MOE_WINDOW + 3
    seq = torch.randint(3, VOCAB, (past_len + 1 + len(TREE),), generator=torch.Generator().manual_seed(past_len)).tolist()
    past, pending, toks = seq[:past_len], seq[past_len], seq[past_len + 1 :]
    with torch.no_grad():
        reference = {i: model(input_ids=torch.tensor([past + [pending] + [toks[j] for j in path_to_node(TREE, i)]])).logits[0, -1]
                     for i in range(-1, len(TREE))}
        logits, cache, _ = _tree_forward(model, SpeculativeDecoder(moe_verifier(arch), None), past, pending, toks)
        assert _max_error(logits, reference) < 1e-4
        path = path_to_node(TREE, 6)  # through a later branch: rows that are not a prefix move
        keep_positions(cache, past_len, [0] + [i + 1 for i in path])
        fresh = new_cache(model)
        model(input_ids=torch.tensor([past + [pending] + [toks[i] for i in path]]), **cache_kwargs(model, fresh), use_cache=True)
    for mine, theirs in zip(cache.layers, fresh.layers):
        assert mine.keys.shape == theirs.keys.shape
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)  # float noise of other matmul shapes
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)


class FlatCost:
    """A verify cost that does not grow with the token count (a GPU's): goodput control drafts."""

    def __call__(self, q):
        return 100.0

    def observe(self, q, seconds):
        pass


@functools.lru_cache(maxsize=None)
def noisy_model(arch: str):
    return noisy_copy(moe_verifier(arch).model)


@functools.lru_cache(maxsize=None)
def medusa_heads(arch: str):
    return random_medusa_heads(moe_verifier(arch), 4)


@functools.lru_cache(maxsize=None)
def random_eagle3(arch: str) -> Eagle3Model:
    """An untrained EAGLE-3 drafter (its LM head the verifier's): drafts are mostly rejected."""
    v = moe_verifier(arch)
    torch.manual_seed(0)
    model = Eagle3Model(Eagle3Config.from_verifier(v, VOCAB), d2t=draft_vocab_d2t(torch.arange(VOCAB)))
    init_from_verifier(model, v)
    return model


def make_drafter(kind: str, v: Verifier, arch: str):
    from specheads.drafters.medusa import MedusaDrafter

    return {
        "ngram": NgramDrafter,
        "self": lambda: DraftModelDrafter(v.model, VOCAB),
        "noisy": lambda: DraftModelDrafter(noisy_model(arch), VOCAB),
        "medusa_tree": lambda: MedusaDrafter(medusa_heads(arch), v, tree="tree8"),
        "eagle3_chain": lambda: Eagle3Drafter(random_eagle3(arch), v, tree="chain"),
        "eagle3_tree": lambda: Eagle3Drafter(random_eagle3(arch), v, tree=8, top_k=3),
        "eagle3_auto": lambda: Eagle3Drafter(random_eagle3(arch), v, tree="auto", top_k=3),  # the CLI's default
    }[kind]()


# kind -> (draft length, goodput control)
KINDS = {"ngram": (4, False), "self": (4, False), "noisy": (3, False), "noisy_goodput": (4, True), "medusa_tree": (3, False),
         "eagle3_chain": (3, False), "eagle3_tree": (3, False), "eagle3_auto_goodput": (3, True)}
TREES = ("medusa_tree", "eagle3_tree", "eagle3_auto_goodput")


def decode_all(arch: str, v: Verifier, kind: str, monkeypatch) -> tuple[int, int]:
    """Decode every prompt; each must be transformers' greedy output, and the engine's cache at the
    end must hold what a fresh prefill of everything but the pending token holds. Returns
    (accepted, drafted) summed over the prompts."""
    caches = []

    def capturing_new_cache(model):
        caches.append(new_cache(model))
        return caches[-1]

    monkeypatch.setattr(engine_mod, "new_cache", capturing_new_cache)
    k, goodput = KINDS[kind]
    control = dict(control="goodput", cost=FlatCost()) if goodput else dict(control="fixed")
    accepted = drafted = checked = 0
    for prompt in PROMPTS:
        drafter = make_drafter(kind.removesuffix("_goodput"), v, arch)
        out = SpeculativeDecoder(v, drafter, num_draft_tokens=k, **control).generate(list(prompt), max_new_tokens=N_NEW, eos_token_ids=[EOS])
        ref = list(reference(arch, prompt))
        assert out.token_ids == ref, f"{arch} {kind} prompt {prompt}"
        accepted += sum(out.stats.accepted_at)
        drafted += sum(out.stats.drafted_at)
        if out.finish_reason == "eos":  # the cache may hold accepted drafts past the eos: no further step reads it
            continue
        fresh = new_cache(v.model)
        with torch.no_grad():
            v.model(input_ids=torch.tensor([list(prompt) + ref[:-1]]), **cache_kwargs(v.model, fresh), use_cache=True)
        assert caches[-1].get_seq_length() == len(prompt) + len(ref) - 1
        for mine, theirs in zip(caches[-1].layers, fresh.layers):
            assert mine.keys.shape == theirs.keys.shape  # a sliding layer trimmed back to its window
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked, "no run reached max_new_tokens: the cache was never compared"
    return accepted, drafted


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_decoding_is_lossless(arch, kind, monkeypatch):
    v = moe_verifier(arch)
    assert len(PROMPTS[0]) + N_NEW > 2 * MOE_WINDOW
    if kind in TREES:
        assert SpeculativeDecoder(v, make_drafter(kind.removesuffix("_goodput"), v, arch))._no_trees is None  # trees run, on sliding layers too
    accepted, drafted = decode_all(arch, v, kind, monkeypatch)
    assert drafted > 0
    if kind == "self":
        assert accepted == drafted  # the verifier drafting for itself: every draft kept
    if kind.startswith("noisy"):
        assert 0 < accepted < drafted  # acceptance and rollback both exercised
    if kind == "medusa_tree":
        assert accepted > 0


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_logits_asked_by_the_config_change_nothing(arch, monkeypatch):
    """A checkpoint whose config keeps ``output_router_logits`` from training: chains and trees
    (a 4D mask the load-balancing loss cannot read) decode as before."""
    v = make_verifier(arch, layers=LAYERS)  # moe_verifier's weights, its own config
    v.model.config.output_router_logits = True
    for kind in ("noisy", "medusa_tree"):
        accepted, drafted = decode_all(arch, v, kind, monkeypatch)
        assert accepted > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpt_oss_loaded_with_flash_or_flex_attention_runs_trees_on_eager(monkeypatch):
    """gpt-oss has no sdpa (its sinks run on eager, flash or flex kernels): a tree drafter switches
    a verifier loaded with flex attention to eager, and decodes losslessly; a model that can be
    switched to neither is refused at setup, naming the way out."""
    from specheads.errors import SpecHeadsError

    v = make_verifier("gpt_oss", layers=LAYERS)
    v.model.set_attn_implementation("flex_attention")  # as a CUDA user loads it (flex cannot run sinks on a CPU)
    with pytest.warns(UserWarning, match="'flex_attention' switched to 'eager'"):
        engine = SpeculativeDecoder(v, make_drafter("eagle3_tree", v, "gpt_oss"), num_draft_tokens=3, control="fixed")
    assert v.model.config._attn_implementation == "eager"
    prompt = PROMPTS[0]
    assert engine.generate(list(prompt), max_new_tokens=N_NEW, eos_token_ids=[EOS]).token_ids == list(reference("gpt_oss", prompt))

    v.model.set_attn_implementation("flex_attention")

    def refuse(impl):
        raise ValueError(f"{impl} is not supported")

    monkeypatch.setattr(v.model, "set_attn_implementation", refuse)
    with pytest.raises(SpecHeadsError, match="cannot be switched to either: load it with attn_implementation='sdpa' or 'eager'"):
        SpeculativeDecoder(v, make_drafter("eagle3_tree", v, "gpt_oss"), control="fixed")


# --------------------------------------------------------------------------------------------
# (c) self-distillation through transformers' generate, and the features it captures

AUX = [1, 2, LAYERS]  # the input to layers 1 and 2, and the final norm's output


@functools.lru_cache(maxsize=None)
def text_verifier(arch: str, router_logits: bool = False) -> Verifier:
    """The twin over the character tokenizer of tests/tiny_text.py (eos = <|im_end|>)."""
    from tiny_text import VOCAB_SIZE, char_tokenizer

    tok = char_tokenizer()
    model = make_model(arch, layers=LAYERS, vocab=VOCAB_SIZE)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.eos_token_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.config.output_router_logits = router_logits
    return Verifier(model=model, tokenizer=tok, name=f"tiny-text-{arch}")


@pytest.mark.parametrize("router_logits", [False, True], ids=["plain", "router-logits"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_self_distillation_and_its_features(arch, router_logits, tmp_path):
    from specheads.training.data import generate_self_distillation
    from specheads.training.features import UNKNOWN_ARGMAX, FeatureStore, tokens_key

    v = text_verifier(arch, router_logits)
    store = FeatureStore(tmp_path / "features", v, AUX)
    prompts = ["what is rain, and why?", "hi", "count to five."]  # left padding; past the window of 16
    data = generate_self_distillation(v, prompts, tmp_path / "sd", max_new_tokens=16, batch_size=3, progress=False,
                                      capture=(store, AUX, 64))
    assert len(data) == 3
    for rec in data:
        ids, p = rec["input_ids"], rec["prompt_length"]
        prompt = ids[:p]
        # batched answers are the unbatched greedy ones
        with torch.no_grad():
            alone = v.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, output_router_logits=False,
                                     eos_token_id=v.eos_token_ids, pad_token_id=v.tokenizer.eos_token_id)[0, p:].tolist()
        assert ids[p:] == alone[: len(ids) - p]
        # the captured features are the verifier's own output_hidden_states forward's
        key = tokens_key(ids)
        assert store.has(key)
        aux, last, argmax = store.get([key], len(ids), "cpu")
        with torch.no_grad():
            out = v.model(input_ids=torch.tensor([ids]), output_hidden_states=True, output_router_logits=False)
        ran = len(ids) - 1  # the last token is never run
        ref_aux = torch.cat([out.hidden_states[i][0] for i in AUX], -1)
        scale = float(ref_aux.abs().max())
        torch.testing.assert_close(aux[0, :ran], ref_aux[:ran], atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(last[0, :ran], out.hidden_states[-1][0, :ran], atol=1e-4, rtol=1e-4)
        assert argmax[0, p - 1 : ran].tolist() == out.logits[0, p - 1 : ran].argmax(-1).tolist()
        assert (argmax[0, : p - 1] == UNKNOWN_ARGMAX).all()
    assert max(len(r["input_ids"]) for r in data) > MOE_WINDOW


# --------------------------------------------------------------------------------------------
# (d) EAGLE-3 through the training loop: trains, saves, loads, decodes losslessly

PROMPT_LEN, ANSWER_LEN = 4, 20


def conversations(arch: str, n: int, seed: int):
    from datasets import Dataset

    v = moe_verifier(arch)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=g).tolist()
        rows.append({"input_ids": prompt + hf_greedy(v.model, prompt, ANSWER_LEN, None), "prompt_length": PROMPT_LEN})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_eagle3_trains_saves_loads_and_decodes_losslessly(arch, tmp_path):
    from specheads.drafters import build_drafter
    from specheads.training.loop import train
    from specheads.training.recipe import load_recipe

    v = moe_verifier(arch)
    train_ds, eval_ds = conversations(arch, 16, 0), conversations(arch, 8, 1)
    # aux_layer_ids left to their default (the recipe leaves them None)
    recipe = load_recipe(None, [
        f"training.output_dir={tmp_path / 'run'}", "drafter.kind=eagle3", "objective.ttt_steps=3", "training.batch_size=8",
        "training.lr=0.01", "training.warmup_steps=2", "training.max_steps=16", "training.eval_every=16", "training.save_every=16",
        "training.log_every=1", "training.cache_hidden_states=true", "training.dtype=float32",
    ])
    final = train(recipe, verifier=v, datasets=(train_ds, eval_ds), progress=False)
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == 16 and losses[-1] < 0.8 * losses[0], losses
    chain = build_drafter(final, v, tree="chain")
    assert isinstance(chain, Eagle3Drafter) and chain.hidden_layers == (1, 2)
    assert chain.model.config.rope_parameters == Eagle3Config.from_verifier(v, VOCAB).rope_parameters
    tree = build_drafter(final, v, tree="dyn6", top_k=3)
    accepted = {"chain": 0, "tree": 0}
    for ids in train_ds["input_ids"][:3]:
        prompt = ids[: PROMPT_LEN + 2]
        ref = hf_greedy(v.model, prompt, 30, EOS)  # runs past the training answers and gpt-oss's window
        for name, d in (("chain", chain), ("tree", tree)):
            out = SpeculativeDecoder(v, d, num_draft_tokens=4, control="fixed").generate(prompt, max_new_tokens=30, eos_token_ids=[EOS])
            assert out.token_ids == ref, (name, prompt)
            accepted[name] += sum(out.stats.accepted_at)
    assert accepted["chain"] > 0 and accepted["tree"] > 0, accepted
