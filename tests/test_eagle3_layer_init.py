"""EAGLE-3 recipe options for how training starts and steps: the drafter's layers copied from a
verifier decoder layer (drafter.init_layer, init_qkv_input, init_fc), AdamW's beta2
(training.adam_beta2) and what each TTT step's loss is divided by (objective.loss_normalization).

The key behaviour: started from verifier layer L with fc picking the aux feature L (the input to
layer L) and q/k/v reading the feature half, the drafter's layer on real rows is layer L, number
for number: its residual stream is fc(aux) = hidden_states[L], and its attention reads
cat(input_layernorm(embed), hidden_norm(feature)) through q/k/v whose embed half is zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import EOS, VOCAB, cached_verifier, hf_greedy, make_verifier, moe_verifier
from specheads.checkpoint import load_drafter_state
from specheads.decoding import SpeculativeDecoder
from specheads.drafters import build_drafter
from specheads.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model, init_from_verifier, layer_init_sources, save_eagle3
from specheads.errors import SpecHeadsError
from specheads.training.recipe import load_recipe

IDS = torch.tensor([[5, 9, 13, 7, 30, 22, 11, 40, 3, 17, 8, 50]])
QKV = ("q_proj", "k_proj", "v_proj")


@functools.lru_cache(maxsize=None)
def deep_llama():
    """5 layers, so that layers 2 and 3 are not the last (whose hidden_states entry is normed)."""
    return make_verifier("llama", layers=5)


def drafter(v, aux, num_layers=1, **init) -> Eagle3Model:
    torch.manual_seed(0)
    model = Eagle3Model(Eagle3Config.from_verifier(v, VOCAB, aux, num_layers=num_layers))
    init_from_verifier(model, v, **init)
    return model


def verifier_states(v, aux):
    with torch.no_grad():
        out = v.model(input_ids=IDS, output_hidden_states=True)
    return out.hidden_states, torch.cat([out.hidden_states[i] for i in aux], -1)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_drafter_started_from_verifier_layer_computes_it_on_real_rows(num_layers):
    """aux ids ending in L=2, init_layer=2, q/k/v on the feature half, fc = the identity on L's
    block: training-time test's step 0 and the drafting forward over real rows both give the
    verifier's layer-2 output (hidden_states[3]); with 2 drafter layers, layers 2 and 3's
    (hidden_states[4]). A randomly started drafter does not."""
    v = deep_llama()
    aux = [1, 2]
    hidden, features = verifier_states(v, aux)
    expected = hidden[2 + num_layers][0]
    model = drafter(v, aux, num_layers, layer=2, qkv_input="feature", fc="last")
    with torch.no_grad():
        ttt = model.ttt_forward(features, IDS, v.model.get_input_embeddings(), steps=1)[0][0]
        T = IDS.shape[1]
        rows = Eagle3Drafter(model, v, tree="chain")._run(model.fuse(features[0]), IDS[0, 1:].tolist() + [0], list(range(T)), None)
    torch.testing.assert_close(ttt, expected, rtol=1e-5, atol=1e-4)  # |values| up to ~150: float32 rounding
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        random_start = drafter(v, aux, num_layers).ttt_forward(features, IDS, v.model.get_input_embeddings(), steps=1)[0][0]
    assert (random_start - expected).abs().max() > 1.0


@pytest.mark.parametrize("qkv_input, embed_scale, feature_scale", [("feature", 0.0, 1.0), ("embed", 1.0, 0.0), ("split", 0.5, 0.5)])
def test_copied_tensors_are_the_verifier_layers(qkv_input, embed_scale, feature_scale):
    v = deep_llama()
    base = v.model.model
    model = drafter(v, [1, 3, 2], 2, layer=1, qkv_input=qkv_input, fc="last")
    first, second = model.midlayer, model.layers[0]
    src, src2 = base.layers[1], base.layers[2]
    H = v.hidden_size
    for name in QKV:
        w, mine = getattr(src.self_attn, name).weight, getattr(first.self_attn, name).weight
        assert mine.shape == (w.shape[0], 2 * H)
        assert torch.equal(mine[:, :H], w * embed_scale) and torch.equal(mine[:, H:], w * feature_scale)
        assert torch.equal(getattr(second.self_attn, name).weight, getattr(src2.self_attn, name).weight)  # H wide
    for mine, theirs in ((first, src), (second, src2)):
        assert torch.equal(mine.self_attn.o_proj.weight, theirs.self_attn.o_proj.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(mine.mlp, name).weight, getattr(theirs.mlp, name).weight)
        assert torch.equal(mine.input_layernorm.weight, theirs.input_layernorm.weight)
        assert torch.equal(mine.post_attention_layernorm.weight, theirs.post_attention_layernorm.weight)
    assert torch.equal(first.hidden_norm.weight, src.input_layernorm.weight)
    assert torch.equal(model.norm.weight, base.norm.weight)
    # fc last: the identity on the block of the deepest aux id (3, the second block), zeros elsewhere
    eye, zero = torch.eye(H), torch.zeros(H, H)
    assert torch.equal(model.fc.weight, torch.cat([zero, eye, zero], 1))


def test_fc_mean_and_random_and_layers_left_random_without_init_layer():
    v = deep_llama()
    H = v.hidden_size
    mean = drafter(v, [1, 2, 3], fc="mean")
    assert torch.equal(mean.fc.weight, torch.cat([torch.eye(H) / 3] * 3, 1))
    plain = drafter(v, [1, 2, 3])
    assert torch.equal(mean.midlayer.self_attn.q_proj.weight, plain.midlayer.self_attn.q_proj.weight)  # same seed, untouched
    assert not torch.equal(plain.fc.weight, mean.fc.weight)
    assert torch.equal(plain.norm.weight, torch.ones(H))  # the drafter's own norm, not the verifier's


# ---------------------------------------------------------------------------------- refusals


def config(v, num_layers=1, aux=(1,)):
    return Eagle3Config.from_verifier(v, VOCAB, list(aux), num_layers=num_layers)


def test_a_layer_that_does_not_exist_is_refused_with_the_range():
    v = cached_verifier("llama")  # 2 layers
    with pytest.raises(SpecHeadsError, match=r"drafter.init_layer=40: verifier layer 40 does not exist; the verifier has 2 decoder layers, 0\.\.1"):
        layer_init_sources(config(v), v, 40)
    with pytest.raises(SpecHeadsError, match=r"drafter.init_layer=1: verifier layer 2 does not exist \(drafter layer i starts from "
                       r"verifier layer init_layer \+ i, i < drafter.num_layers=2\); the verifier has 2 decoder layers, 0\.\.1"):
        layer_init_sources(config(v, num_layers=2), v, 1)
    layer_init_sources(config(v, num_layers=2), v, 0)  # layers 0 and 1: fine


def test_a_layer_of_other_shapes_or_tensors_is_refused_naming_layer_tensor_and_shapes():
    v = cached_verifier("llama")
    wider = dataclasses.replace(config(v), intermediate_size=48)
    with pytest.raises(SpecHeadsError, match=r"verifier layer 1 \(LlamaDecoderLayer\): its mlp.gate_proj.weight is \[64, 32\], "
                       r"the drafter's is \[48, 32\]"):
        layer_init_sources(wider, v, 1)
    moe = moe_verifier("qwen3_moe")  # experts, no dense MLP
    with pytest.raises(SpecHeadsError, match=r"verifier layer 2 \(Qwen3MoeDecoderLayer\) has no tensor mlp.gate_proj.weight "
                       r"\(the drafter's is \[64, 32\]\); it has .*mlp.gate.weight"):
        layer_init_sources(config(moe), moe, 2)
    qwen2 = cached_verifier("qwen2")  # q/k/v biases: a Llama layer has none
    with pytest.raises(SpecHeadsError, match=r"verifier layer 0 \(Qwen2DecoderLayer\) has self_attn.q_proj.bias, "
                       r"self_attn.k_proj.bias, self_attn.v_proj.bias, which the drafter's Llama layer has no place for"):
        layer_init_sources(config(qwen2), qwen2, 0)
    gpt2 = cached_verifier("gpt2")
    with pytest.raises(SpecHeadsError, match=r"drafter.init_layer=0: the verifier's MLP activation is 'gelu_new'"):
        layer_init_sources(config(gpt2), gpt2, 0)


def test_a_norm_that_is_not_llamas_is_refused():
    """Gemma's layers carry Llama's tensor names, but its RMSNorm scales by 1 + weight."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from specheads.verifier import Verifier

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, hidden_act="silu", hidden_activation="silu")).eval()
    gemma = Verifier(model=model, tokenizer=None, name="tiny-gemma")
    with pytest.raises(SpecHeadsError, match=r"verifier layer 0 \(GemmaDecoderLayer\): its input_layernorm \(GemmaRMSNorm\) "
                       r"does not compute Llama's RMSNorm"):
        layer_init_sources(config(gemma), gemma, 0)


def test_training_setup_refuses_a_missing_layer_before_any_data(tmp_path):
    from test_eagle3_training import recipe

    from specheads.training.loop import TrainingRun

    run = TrainingRun(recipe(tmp_path / "run", "drafter.init_layer=5"), progress=False)
    with pytest.raises(SpecHeadsError, match=r"drafter.init_layer=5: verifier layer 5 does not exist; the verifier has 2 decoder layers, 0\.\.1"):
        run.setup(cached_verifier("llama"), datasets=None)


def test_a_sharded_verifier_is_refused():
    from specheads.training.sharded_verifier import _MARK, ShardInfo

    v = make_verifier("llama")
    v.model.__dict__[_MARK] = ShardInfo("fsdp", 8, torch.device("cpu"), 0, 0, 0)
    with pytest.raises(SpecHeadsError, match=r"drafter.init_layer=1 copies a verifier layer's weights, which verifier.shard=fsdp "
                       r"splits across 8 processes: not supported"):
        layer_init_sources(config(v), v, 1)


def eagle3_recipe(*overrides):
    return load_recipe(None, ["drafter.kind=eagle3", "data.conversations=x.jsonl", *overrides])


@pytest.mark.parametrize("overrides, match", [
    (["drafter.init_qkv_input=both"], r"drafter.init_qkv_input='both' is not one of feature, embed, split"),
    (["drafter.init_fc=first"], r"drafter.init_fc='first' is not one of random, last, mean"),
    (["objective.loss_normalization=batch"], r"objective.loss_normalization='batch' is not one of valid, all"),
    (["drafter.init_layer=-1"], r"drafter.init_layer=-1 must be a verifier decoder layer index"),
    (["drafter.init_qkv_input=embed"], r"drafter.init_qkv_input='embed' places a verifier layer's q/k/v: it needs drafter.init_layer"),
    (["training.adam_beta2=1.0"], r"training.adam_beta2=1.0 is out of range"),
    (["training.adam_beta2=0"], r"training.adam_beta2=0.0 is out of range"),
])
def test_recipe_refuses_bad_values(overrides, match):
    with pytest.raises(SpecHeadsError, match=match):
        eagle3_recipe(*overrides)


@pytest.mark.parametrize("key, value", [("drafter.init_layer", "3"), ("drafter.init_fc", "last"), ("drafter.init_qkv_input", "split"),
                                        ("objective.loss_normalization", "all")])
def test_eagle3_settings_are_refused_for_other_kinds(key, value):
    with pytest.raises(SpecHeadsError, match=rf"recipe value {key}=.*is for drafter.kind=eagle3, not medusa"):
        load_recipe(None, ["drafter.kind=medusa", "data.conversations=x.jsonl", f"{key}={value}"])


def test_recipe_defaults_keep_todays_behaviour():
    r = eagle3_recipe()
    assert (r.drafter.init_layer, r.drafter.init_qkv_input, r.drafter.init_fc) == (None, "feature", "random")
    assert r.objective.loss_normalization == "valid" and r.training.adam_beta2 == 0.999
    r = eagle3_recipe("drafter.init_layer=1", "drafter.init_qkv_input=split", "drafter.init_fc=mean", "training.adam_beta2=0.95")
    assert (r.drafter.init_layer, r.drafter.init_qkv_input, r.drafter.init_fc, r.training.adam_beta2) == (1, "split", "mean", 0.95)


# ---------------------------------------------------------------------------------- the loss


def test_loss_normalization_valid_and_all_on_a_hand_checked_batch():
    """Two draft tokens, student logits 0 (log q = ln 1/2 everywhere): every scored position adds
    ln 2. Step 0 scores 3 positions (a 4th has its verifier argmax, id 2, outside the draft
    vocabulary), step 1 scores 2. valid: ln2 + 0.8 ln2. all: (3 ln2 + 0.8 * 2 ln2) / (B x T = 2 x 5)."""
    from specheads.training.objectives.eagle3 import Eagle3Objective

    def rows(n, out_of_vocab=0):
        target = torch.log(torch.tensor([[0.25, 0.75]] * n))
        argmax = torch.tensor([1] * (n - out_of_vocab) + [2] * out_of_vocab)
        return torch.zeros(n, 2, requires_grad=True), target, argmax, None

    obj = Eagle3Objective.__new__(Eagle3Objective)
    obj.steps, obj.weights = 2, [1.0, 0.8]
    obj.to_draft = torch.tensor([0, 1, -1])
    obj._steps = lambda module, batch, steps, teacher=True: [rows(4, out_of_vocab=1), rows(2)]
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    ln2 = math.log(2)
    expected = {"valid": (ln2 + 0.8 * ln2, [ln2, ln2]), "all": ((3 * ln2 + 0.8 * 2 * ln2) / 10, [3 * ln2 / 10, 2 * ln2 / 10])}
    for mode, (total, per_step) in expected.items():
        obj.normalization = mode
        seen = []
        loss, metrics = obj.loss(None, batch, normalize=lambda count: seen.append(float(count)) or count)
        assert float(loss.detach()) == pytest.approx(total, rel=1e-6), mode
        assert [metrics["loss/step0"], metrics["loss/step1"]] == pytest.approx(per_step, rel=1e-6)
        assert seen == ([3.0, 2.0] if mode == "valid" else [10.0, 10.0])  # what the loop sums over a step's micro-batches


# ---------------------------------------------------------------------------------- the loop


def test_training_with_init_layer_and_adam_beta2_decodes_losslessly_and_saves_the_usual_drafter(tmp_path):
    """Through the real loop: the objective's drafter starts as verifier layer 1, the optimizer
    gets beta2, it trains, and the drafter it writes has the usual tensors and config keys,
    decodes losslessly (greedy, float32) and exports for vLLM."""
    from test_eagle3_training import conversations, datasets, recipe

    from specheads.export import export_vllm
    from specheads.training.loop import TrainingRun

    v = cached_verifier("llama")
    r = recipe(tmp_path / "run", "drafter.aux_layer_ids=[1]", "drafter.init_layer=1", "drafter.init_fc=last", "training.adam_beta2=0.95",
               "objective.loss_normalization=all", "training.max_steps=6", "training.save_every=100", "training.eval_every=6",
               "training.cache_hidden_states=false")
    run = TrainingRun(r, progress=False)
    run.setup(v, datasets())
    run.build(None)
    assert all(group["betas"] == (0.9, 0.95) for group in run.optimizer.param_groups)
    start = run.objective.module
    assert torch.equal(start.midlayer.mlp.down_proj.weight, v.model.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(start.midlayer.self_attn.q_proj.weight[:, v.hidden_size:], v.model.model.layers[1].self_attn.q_proj.weight)
    final = run.train()

    losses = [h["loss"] for h in run.history if "loss" in h]
    assert losses[-1] < losses[0], losses
    config, tensors = load_drafter_state(final)
    model = Eagle3Model(Eagle3Config.from_verifier(v, 48, [1]), d2t=tensors["d2t"])
    save_eagle3(tmp_path / "plain", model, v)
    plain_config, plain_tensors = load_drafter_state(tmp_path / "plain")
    assert tensors.keys() == plain_tensors.keys()
    assert set(config["specheads"]["hyper_parameters"]) == set(plain_config["specheads"]["hyper_parameters"]) | {"training"}
    assert not torch.equal(tensors["midlayer.mlp.down_proj.weight"], v.model.model.layers[1].mlp.down_proj.weight)  # it trained

    chain = build_drafter(final, v, tree="chain")
    accepted = 0
    for prompt in conversations(8, 1)["input_ids"][:2]:
        prompt = prompt[:6]
        out = SpeculativeDecoder(v, chain, num_draft_tokens=4, control="fixed").generate(prompt, max_new_tokens=20, eos_token_ids=[EOS])
        assert out.token_ids == hf_greedy(v.model, prompt, 20, EOS)
        accepted += sum(out.stats.accepted_at)
    assert accepted > 0
    export = export_vllm(final, tmp_path / "vllm", verifier=v)
    assert export.method == "eagle3"


def test_objective_namespace_without_the_new_keys_keeps_todays_start():
    """Scripts build the objective from namespaces with the older keys: random layers, valid."""
    from specheads.training.objectives.eagle3 import Eagle3Objective

    v = cached_verifier("llama")
    obj = Eagle3Objective(v, SimpleNamespace(aux_layer_ids=[1], num_layers=1), SimpleNamespace(ttt_steps=2, ttt_decay=0.8), torch.arange(VOCAB))
    assert obj.normalization == "valid"
    assert not torch.equal(obj.module.midlayer.mlp.down_proj.weight, v.model.model.layers[1].mlp.down_proj.weight)
