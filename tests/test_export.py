"""`specheads export --format vllm|sglang|speculators`: the folders the engines' loaders take,
exact round trips, refusals.

Neither engine is needed here (scripts/vllm_interop.sh checks the folders against the real vLLM;
one test reads them with vLLM's config code where its venv is here): these tests pin the layout
the loaders read, SGLang's from its source (cited below). vLLM's Medusa config renames keys
containing "num" + "heads"/"layers", reads the block bias only with ``medusa_fc_bias``, a shared
head only with ``original_lm_head`` as ``lm_heads.0.weight``, and builds own heads over the full
vocabulary.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specheads.cli import main as cli_main
from specheads.drafters.medusa import MedusaConfig, MedusaHeads, save_medusa
from specheads.errors import SpecHeadsError
from specheads.export import VLLM_EXPORTERS, check_vllm_medusa_config, export_drafter, export_vllm

from conftest import cached_verifier, make_model

H = 32  # the tiny verifiers' hidden size


@pytest.fixture
def llama():
    return cached_verifier("llama", 0)


def random_heads(verifier, *, seed=0, **cfg) -> MedusaHeads:
    """Medusa heads with every parameter random (blocks start at zero otherwise)."""
    torch.manual_seed(seed)
    token_map = None
    if cfg.get("draft_vocab_size"):
        token_map = torch.randperm(verifier.vocab_size)[: cfg["draft_vocab_size"]]
    heads = MedusaHeads(MedusaConfig(hidden_size=H, vocab_size=verifier.vocab_size, **cfg), token_map=token_map)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    return heads


def exported(out):
    return json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))


def heads_from_vllm_folder(config: dict, tensors: dict) -> MedusaHeads:
    """What vLLM builds from the folder, as specheads modules (strict load: every tensor used)."""
    heads = MedusaHeads(MedusaConfig(
        hidden_size=config["hidden_size"], vocab_size=config["vocab_size"], num_heads=config["num_heads"],
        num_layers=config["num_hidden_layers"], shared_lm_head=config["original_lm_head"], bias=config["medusa_fc_bias"],
    ))
    own = {k: v for k, v in tensors.items() if not (config["original_lm_head"] and k == "lm_heads.0.weight")}
    heads.load_state_dict(own, strict=True)
    return heads


# -- Medusa: layout and exact round trips ------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_medusa_own_heads_round_trip(llama, tmp_path, bias):
    heads = random_heads(llama, num_heads=3, num_layers=2, bias=bias)
    save_medusa(tmp_path / "ckpt", heads, llama)
    export = export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert (export.method, export.max_speculative_tokens, export.engine_args) == ("medusa", 3, {})
    config, tensors = exported(tmp_path / "vllm")
    assert config == {
        "model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": H, "vocab_size": llama.vocab_size,
        "num_heads": 3, "num_hidden_layers": 2, "medusa_fc_bias": bias, "original_lm_head": False,
    }
    expected = {f"blocks.{h}.layers.{l}.weight" for h in range(3) for l in range(2)} | {f"lm_heads.{h}.weight" for h in range(3)}
    if bias:
        expected |= {f"blocks.{h}.layers.{l}.bias" for h in range(3) for l in range(2)}
    assert set(tensors) == expected
    hidden = torch.randn(5, H)
    torch.testing.assert_close(heads_from_vllm_folder(config, tensors)(hidden), heads(hidden), rtol=0, atol=0)


def test_medusa_shared_head_writes_the_verifiers_head(llama, tmp_path):
    heads = random_heads(llama, num_heads=2, shared_lm_head=True)
    save_medusa(tmp_path / "ckpt", heads, llama)
    export_vllm(tmp_path / "ckpt", tmp_path / "vllm", verifier=llama)
    config, tensors = exported(tmp_path / "vllm")
    assert config["original_lm_head"] is True
    lm_head = llama.model.get_output_embeddings().weight
    assert set(tensors) == {"blocks.0.layers.0.weight", "blocks.0.layers.0.bias", "blocks.1.layers.0.weight", "blocks.1.layers.0.bias", "lm_heads.0.weight"}
    torch.testing.assert_close(tensors["lm_heads.0.weight"], lm_head, rtol=0, atol=0)
    hidden = torch.randn(4, H)
    rebuilt = heads_from_vllm_folder(config, tensors)
    torch.testing.assert_close(rebuilt(hidden, tensors["lm_heads.0.weight"]), heads(hidden, lm_head), rtol=0, atol=0)


def test_medusa_shared_head_over_a_truncated_vocabulary(llama, tmp_path):
    heads = random_heads(llama, num_heads=2, shared_lm_head=True, draft_vocab_size=20)
    save_medusa(tmp_path / "ckpt", heads, llama)
    export = export_vllm(tmp_path / "ckpt", tmp_path / "vllm", verifier=llama)
    # vLLM 0.32 registers token_map while loading without reporting it: its strict check must be off
    assert export.engine_args == {"model_loader_extra_config": {"enable_weights_track": False}}
    config, tensors = exported(tmp_path / "vllm")
    assert config["original_lm_head"] is True and config["truncated_vocab_size"] == 20
    torch.testing.assert_close(tensors["token_map"], heads.token_map, rtol=0, atol=0)
    lm_head = llama.model.get_output_embeddings().weight
    # vLLM: the shared head keeps the token_map's rows, logits land at those ids, -inf elsewhere
    blocks = {k: v for k, v in tensors.items() if k.startswith("blocks.")}
    rebuilt = MedusaHeads(MedusaConfig(hidden_size=H, vocab_size=llama.vocab_size, num_heads=2, shared_lm_head=True))
    rebuilt.load_state_dict(blocks, strict=True)
    hidden = torch.randn(4, H)
    truncated = torch.stack([torch.nn.functional.linear(f, tensors["lm_heads.0.weight"][tensors["token_map"]]) for f in rebuilt.features(hidden)])
    vllm_logits = torch.full((2, 4, llama.vocab_size), float("-inf"))
    vllm_logits[..., tensors["token_map"]] = truncated
    ours = heads(hidden, lm_head)  # [2, 4, 20] over the draft vocabulary
    torch.testing.assert_close(vllm_logits[..., heads.token_map], ours, rtol=0, atol=0)
    assert torch.equal(heads.to_verifier_ids(ours.argmax(-1)), vllm_logits.argmax(-1))


def test_medusa_shared_head_refuses_a_different_verifier(llama, tmp_path):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=2, shared_lm_head=True), llama)
    with pytest.raises(SpecHeadsError, match="trained for"):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm", verifier=cached_verifier("llama", 1))
    assert not (tmp_path / "vllm").exists()


def test_medusa_permuted_full_draft_vocabulary_is_put_in_verifier_order(llama, tmp_path):
    heads = random_heads(llama, num_heads=2, draft_vocab_size=llama.vocab_size)  # token_map: a permutation
    save_medusa(tmp_path / "ckpt", heads, llama)
    export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    config, tensors = exported(tmp_path / "vllm")
    assert "token_map" not in tensors and "truncated_vocab_size" not in config  # vLLM ignores token_map at full size
    hidden = torch.randn(3, H)
    full = heads_from_vllm_folder(config, tensors)(hidden)
    torch.testing.assert_close(full[..., heads.token_map], heads(hidden), rtol=0, atol=0)


def test_no_tensor_or_key_vllm_would_misread(llama, tmp_path):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=4), llama)
    export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    config, tensors = exported(tmp_path / "vllm")
    renamed = [k for k in config if "num" in k and ("heads" in k or "layers" in k)]
    assert renamed == ["num_heads", "num_hidden_layers"]
    assert "specheads" not in config
    assert not any(k.startswith(("model.", "medusa_heads.")) for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())


# -- Medusa: refusals --------------------------------------------------------------------------
def test_own_heads_over_a_truncated_vocabulary_are_refused(llama, tmp_path):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=2, draft_vocab_size=16), llama)
    with pytest.raises(SpecHeadsError, match=r"truncated draft vocabulary.*original_lm_head"):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # no temp folder left behind


def test_check_vllm_medusa_config_names_renamed_keys():
    check_vllm_medusa_config({"num_heads": 3, "num_hidden_layers": 1, "hidden_size": 8})
    with pytest.raises(SpecHeadsError, match="medusa_num_heads"):
        check_vllm_medusa_config({"num_heads": 3, "medusa_num_heads": 5})
    with pytest.raises(SpecHeadsError, match="num_layers"):
        check_vllm_medusa_config({"num_hidden_layers": 1, "num_layers": 2})


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "hyper_parameters":
            config["specheads"]["hyper_parameters"].update(value)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    ({"medusa_num_layers": 2}, "medusa_num_layers"),  # vLLM would take it as num_hidden_layers
    ({"num_heads": 5}, "num_heads=5 vs 3"),  # the folder's vLLM keys disagree with its hyper-parameters
    ({"hyper_parameters": {"num_lora_layers": 2}}, "num_lora_layers"),  # an option the exporter does not know
])
def test_medusa_options_vllm_cannot_express_are_refused(llama, tmp_path, changes, named):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=3), llama)
    edit_config(tmp_path / "ckpt", **changes)
    with pytest.raises(SpecHeadsError, match=named):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_speculative_config_refuses_more_tokens_than_heads(llama, tmp_path):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=2), llama)
    export = export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert export.speculative_config(2) == {"method": "medusa", "model": str(tmp_path / "vllm"), "num_speculative_tokens": 2}
    with pytest.raises(SpecHeadsError, match="exceeds the 2 heads"):
        export.speculative_config(3)


# -- draft models -------------------------------------------------------------------------------
def save_draft_model(folder, *, specheads_block=True, vocab=None, verifier_info=None):
    from tiny_text import VOCAB_SIZE, char_tokenizer

    model = make_model("llama", seed=3, vocab=vocab or VOCAB_SIZE)
    model.save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    if specheads_block:  # as specheads' distillation writes it
        config = json.loads((folder / "config.json").read_text())
        config["specheads"] = {"format_version": 1, "drafter_kind": "draft_model", "hyper_parameters": {"num_hidden_layers": 2},
                               "verifier": verifier_info or {"name": "tiny"}}
        (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("specheads_block", [True, False])
def test_draft_model_round_trip(tmp_path, specheads_block):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = save_draft_model(tmp_path / "student", specheads_block=specheads_block)
    export = export_vllm(tmp_path / "student", tmp_path / "vllm")
    assert (export.method, export.max_speculative_tokens) == ("draft_model", None)
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert "specheads" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in (tmp_path / "vllm").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "vllm").glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "vllm").eval()
    ids = torch.tensor([[3, 7, 1, 12, 5, 9]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "vllm")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "student").get_vocab()


def test_draft_model_with_another_vocabulary_is_refused(llama, tmp_path):
    save_draft_model(tmp_path / "student", specheads_block=False, vocab=llama.vocab_size + 5)
    with pytest.raises(SpecHeadsError, match="vocabulary size"):
        export_vllm(tmp_path / "student", tmp_path / "vllm", verifier=llama)
    assert not (tmp_path / "vllm").exists()


def test_distilled_draft_model_for_another_verifier_is_refused(llama, tmp_path):
    from specheads.checkpoint import verifier_info

    save_draft_model(tmp_path / "student", vocab=llama.vocab_size, verifier_info=verifier_info(cached_verifier("llama", 1)))
    with pytest.raises(SpecHeadsError, match="trained for"):
        export_vllm(tmp_path / "student", tmp_path / "vllm", verifier=llama)
    assert not (tmp_path / "vllm").exists()


# -- bad input: clear message, nothing half-written ----------------------------------------------
def test_missing_checkpoint(tmp_path):
    with pytest.raises(SpecHeadsError, match="not found"):
        export_vllm(tmp_path / "nothing", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


@pytest.mark.parametrize("config_text, named", [
    (None, "has no config.json"),
    ("{not json", "corrupt"),
    ('{"hello": 1}', "config.json is neither a specheads drafter checkpoint"),
    ('{"specheads": {"drafter_kind": "eagle"}}', "no vLLM export"),
])
def test_bad_config(tmp_path, config_text, named):
    (tmp_path / "ckpt").mkdir()
    if config_text is not None:
        (tmp_path / "ckpt" / "config.json").write_text(config_text)
    with pytest.raises(SpecHeadsError, match=named):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_truncated_weights_keep_the_previous_export(llama, tmp_path):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=2), llama)
    export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    before = (tmp_path / "vllm" / "model.safetensors").read_bytes()
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(SpecHeadsError, match="corrupt or truncated"):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert (tmp_path / "vllm" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "vllm"]


def test_corrupt_draft_model_weights(tmp_path):
    save_draft_model(tmp_path / "student")
    weights = tmp_path / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SpecHeadsError, match="does not load"):
        export_vllm(tmp_path / "student", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_output_over_the_checkpoint_is_refused(llama, tmp_path):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=2), llama)
    with pytest.raises(SpecHeadsError, match="the drafter checkpoint itself"):
        export_vllm(tmp_path / "ckpt", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


# -- the command --------------------------------------------------------------------------------
def test_cli_export(llama, tmp_path, capsys):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=3), llama)
    assert cli_main(["export", "--format", "vllm", str(tmp_path / "ckpt"), str(tmp_path / "vllm")]) == 0
    out = capsys.readouterr().out
    assert '"method": "medusa"' in out and '"num_speculative_tokens": 3' in out
    assert (tmp_path / "vllm" / "model.safetensors").is_file()


def test_cli_export_error_is_one_line(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "vllm")]) == 2
    assert "specheads: error: drafter checkpoint not found" in capsys.readouterr().err


def test_every_exporter_kind_is_registered():
    assert {"medusa", "draft_model", "eagle3"} <= set(VLLM_EXPORTERS)


# -- EAGLE-3 ------------------------------------------------------------------------------------
# vLLM 0.32's llama_eagle3 computes, from the folder alone (its aux states are the target's
# residual stream after k layers, concatenated in layer order; transformers' hidden_states[k]
# for k < N): the reference below re-implements that forward in plain torch, so the round trip
# checks names, fc block order, layer renaming and d2t against specheads' own forward.
@functools.lru_cache(maxsize=None)
def deep_llama():
    """A 4-layer tiny Llama: aux ids 1..3 are all exportable (id N = 4 is not)."""
    from specheads.verifier import Verifier

    return Verifier(model=make_model("llama", seed=5, layers=4), tokenizer=None, name="tiny-llama-4layers")


def eagle3_model(verifier, *, aux, draft_vocab=None, num_layers=1, seed=0, d2t=None):
    from specheads.drafters.eagle3 import Eagle3Config, Eagle3Model, draft_vocab_d2t

    torch.manual_seed(seed)
    size = draft_vocab or verifier.vocab_size
    if d2t is None:
        d2t = draft_vocab_d2t(torch.randperm(verifier.vocab_size)[:size])
    model = Eagle3Model(Eagle3Config.from_verifier(verifier, size, aux, num_layers=num_layers), d2t=d2t)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not ones, so that swapped norms show
                p.uniform_(0.5, 1.5)
    return model.eval()


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def vllm_eagle3_forward(config, tensors, embed, hidden_states, input_ids, *, capture=None, first_layer="midlayer"):
    """vLLM's Eagle3LlamaForCausalLM over one sequence: row t reads the target's features at t
    and the token input_ids[t]; returns (target-vocabulary logits [T, V], pre-norm output [T, H]).
    ``capture``: the residual streams the target hands over (default: the config's eagle_config
    ids); ``first_layer``: the first layer's weight prefix (vLLM renames midlayer to layers.0).
    SGLang's one-layer LlamaForCausalLMEagle3 computes the same."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    eps, H = config["rms_norm_eps"], config["hidden_size"]
    layer_ids = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] if capture is None else capture
    captured = [hidden_states[k] for k in range(len(hidden_states)) if k in layer_ids]  # layer order
    h = torch.cat(captured, -1) @ tensors["fc.weight"].T
    T = h.shape[0]
    embeds = embed(input_ids)
    llama = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "eagle_config", "rope_scaling")})
    cos, sin = LlamaRotaryEmbedding(llama)(h[None], torch.arange(T)[None])
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    residual = None
    for li in range(config["num_hidden_layers"]):
        w = lambda n: tensors[(f"{first_layer}." if li == 0 else f"layers.{li}.") + n]  # noqa: E731
        if li == 0:
            residual = h
            x = torch.cat([_rms(embeds, w("input_layernorm.weight"), eps), _rms(h, w("hidden_norm.weight"), eps)], -1)
        else:
            residual = h + residual
            x = _rms(residual, w("input_layernorm.weight"), eps)
        q = (x @ w("self_attn.q_proj.weight").T).view(1, T, heads, d).transpose(1, 2)
        k = (x @ w("self_attn.k_proj.weight").T).view(1, T, kv, d).transpose(1, 2)
        v = (x @ w("self_attn.v_proj.weight").T).view(1, T, kv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = att.transpose(1, 2).reshape(T, heads * d) @ w("self_attn.o_proj.weight").T
        residual = h + residual
        x = _rms(residual, w("post_attention_layernorm.weight"), eps)
        h = (torch.nn.functional.silu(x @ w("mlp.gate_proj.weight").T) * (x @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
    prenorm = h + residual
    logits = _rms(prenorm, tensors["norm.weight"], eps) @ tensors["lm_head.weight"].T
    if "d2t" in tensors:
        full = logits.new_full((T, config["vocab_size"]), float("-inf"))
        full[:, torch.arange(config["draft_vocab_size"]) + tensors["d2t"]] = logits
        logits = full
    return logits, prenorm


def specheads_eagle3_forward(model, verifier, input_ids, hidden_states):
    """specheads' drafter over the same rows (its aux order, its names)."""
    from specheads.drafters.eagle3 import Eagle3Drafter

    aux = torch.cat([hidden_states[i] for i in model.config.aux_layer_ids], -1)
    drafter = Eagle3Drafter(model, verifier, tree="chain")
    prenorm = drafter._run(model.fuse(aux), input_ids.tolist(), list(range(len(input_ids))), None)
    return drafter._to_target(model.logits(prenorm)), prenorm


@pytest.mark.parametrize("aux, draft_vocab, num_layers", [
    ([3, 1, 2], 40, 1),  # ids out of order, a truncated draft vocabulary (d2t)
    ([1, 2, 3], None, 2),  # full vocabulary (no d2t), a second layer
    ([2, 1], 50, 3),  # two aux layers, three layers
])
def test_eagle3_round_trip(tmp_path, aux, draft_vocab, num_layers):
    from specheads.drafters.eagle3 import save_eagle3

    verifier = deep_llama()
    model = eagle3_model(verifier, aux=aux, draft_vocab=draft_vocab, num_layers=num_layers)
    save_eagle3(tmp_path / "ckpt", model, verifier)
    export = export_vllm(tmp_path / "ckpt", tmp_path / "vllm", verifier=verifier)
    assert (export.method, export.max_speculative_tokens, export.engine_args) == ("eagle3", None, {})
    assert export.speculative_config(4) == {"method": "eagle3", "model": str(tmp_path / "vllm"), "num_speculative_tokens": 4}
    config, tensors = exported(tmp_path / "vllm")
    V, Vd = verifier.vocab_size, draft_vocab or verifier.vocab_size
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and "specheads" not in config
    assert (config["num_hidden_layers"], config["vocab_size"], config["draft_vocab_size"], config["target_hidden_size"]) == (num_layers, V, Vd, H)
    assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": sorted(aux), "use_aux_hidden_state": True}
    assert not any(config[k] for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"))
    layer = {"input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "hidden_norm"}
    expected = {"fc.weight", "norm.weight", "lm_head.weight"} | {f"midlayer.{n}.weight" for n in layer}
    expected |= {f"layers.{i}.{n}.weight" for i in range(1, num_layers) for n in layer}
    if draft_vocab:
        expected |= {"d2t", "t2d"}
    assert set(tensors) == expected  # never the verifier's embedding: vLLM shares the target's
    assert tensors["fc.weight"].shape == (H, len(aux) * H) and tensors["lm_head.weight"].shape == (Vd, H)
    if draft_vocab:
        assert tensors["d2t"].dtype == torch.int64
    # the numbers vLLM computes from the folder == specheads' drafter
    ids = torch.tensor([5, 9, 13, 7, 30, 22, 11, 40, 3])
    with torch.no_grad():
        hs = [h[0] for h in verifier.model(input_ids=ids[None], output_hidden_states=True).hidden_states]
        ours_logits, ours_pre = specheads_eagle3_forward(model, verifier, ids, hs)
        theirs_logits, theirs_pre = vllm_eagle3_forward(config, tensors, verifier.model.get_input_embeddings(), hs, ids)
    torch.testing.assert_close(theirs_pre, ours_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(theirs_logits.argmax(-1), ours_logits.argmax(-1))


def test_eagle3_permuted_full_vocabulary_is_put_in_verifier_order(tmp_path):
    from specheads.drafters.eagle3 import save_eagle3

    verifier = deep_llama()
    V = verifier.vocab_size
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    model = eagle3_model(verifier, aux=[1, 2, 3], d2t=perm - torch.arange(V))  # draft id i -> verifier id perm[i]
    save_eagle3(tmp_path / "ckpt", model, verifier)
    export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    config, tensors = exported(tmp_path / "vllm")
    assert "d2t" not in tensors and "t2d" not in tensors  # vLLM 0.32 fails to load a d2t at full size
    torch.testing.assert_close(tensors["lm_head.weight"][perm], model.lm_head.weight, rtol=0, atol=0)


def test_eagle3_cli_export(tmp_path, capsys):
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(deep_llama(), aux=[1, 2, 3], draft_vocab=30), deep_llama())
    assert cli_main(["export", "--format", "vllm", str(tmp_path / "ckpt"), str(tmp_path / "vllm")]) == 0
    out = capsys.readouterr().out
    assert '"method": "eagle3"' in out and "goodput control" in out and "drafts a chain" in out


def test_hybrid_export_writes_the_trained_part_and_names_what_vllm_cannot_merge(tmp_path, capsys):
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(deep_llama(), aux=[1, 2, 3], draft_vocab=30), deep_llama())
    assert cli_main(["export", "--format", "vllm", f"{tmp_path / 'ckpt'}+ngram+suffix", str(tmp_path / "vllm")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "vllm" / "config.json").is_file() and '"method": "eagle3"' in out
    assert "the n-gram part" in out and '"method": "ngram"' in out and "the suffix part" in out and "arctic-inference" in out
    assert cli_main(["export", "--format", "vllm", "ngram+suffix", str(tmp_path / "none")]) == 2
    assert "name one trained drafter folder" in capsys.readouterr().err


@pytest.mark.parametrize("aux, named", [
    ([1, 2, 4], "aux layer id 4"),  # transformers' last hidden state is after the final norm; vLLM's id N is not
    ([2, 2, 3], r"\[2\] repeated"),  # vLLM captures a layer once
])
def test_eagle3_aux_layers_vllm_cannot_capture_are_refused(tmp_path, aux, named):
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(deep_llama(), aux=aux, draft_vocab=30), deep_llama())
    with pytest.raises(SpecHeadsError, match=named):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_eagle3_unknown_option_and_other_verifier_are_refused(tmp_path):
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(deep_llama(), aux=[1, 2, 3], draft_vocab=30), deep_llama())
    with pytest.raises(SpecHeadsError, match="trained for"):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm", verifier=cached_verifier("llama", 0))
    edit_config(tmp_path / "ckpt", hyper_parameters={"norm_before_fc": True})
    with pytest.raises(SpecHeadsError, match="norm_before_fc"):
        export_vllm(tmp_path / "ckpt", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


# -- EAGLE-3 for SGLang (--format sglang) --------------------------------------------------------
# What SGLang's loader reads, from python/sglang/srt/models/llama_eagle3.py (LlamaForCausalLMEagle3;
# sgl-project/sglang 03d5a7771f6082e7737a5f19cae7d1e863087013 and d737979cbd17c6162f39c1953cfa72d3d23cc0d0),
# its base python/sglang/srt/models/llama.py (LlamaDecoderLayer, LlamaAttention) and
# model_executor/model_runner.py (eagle_config): each key with the value a specheads drafter needs
# (None: its value is the drafter's), so that no SGLang default decides it.
SGLANG_CONFIG_READS = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "model_type": "llama",  # SGLang checks model_type == "llama4_text"
    "num_hidden_layers": 1,  # "EAGLE3 currently only supports 1 layer"
    "tie_word_embeddings": False,  # true: the embedding would be the LM head
    "draft_vocab_size": None,  # None: the target's head would be borrowed
    "target_hidden_size": None,  # fc = Linear(3 * target_hidden_size, hidden_size, bias=config.bias)
    "bias": False,
    "attention_bias": False,
    "hidden_act": "silu",  # the only activation LlamaMLP takes
    "hidden_size": None, "intermediate_size": None, "num_attention_heads": None, "num_key_value_heads": None,
    "head_dim": None, "rms_norm_eps": None, "vocab_size": None, "max_position_embeddings": None,  # default 8192
    "rope_theta": None, "rope_scaling": None, "rope_is_neox_style": True, "partial_rotary_factor": 1.0,
    "eagle_config": None,  # eagle_aux_hidden_state_layer_ids, use_aux_hidden_state
}
SGLANG_LAYER_WEIGHTS = ("input_layernorm", "hidden_norm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def sglang_capture(layer_ids: list[int], *, before_pr_25454: bool) -> list[int]:
    """The target layers SGLang's LlamaForCausalLM.set_eagle3_layers_to_capture captures (the
    residual stream entering layer i, transformers' hidden_states[i]) for eagle_config's ids:
    +1 always before sgl-project/sglang PR #25454, since then only when the first id is 1."""
    if before_pr_25454 or layer_ids[0] == 1:
        return sorted(i + 1 for i in layer_ids)
    return sorted(layer_ids)


@functools.lru_cache(maxsize=None)
def llama6():
    """A 6-layer tiny Llama: room for three aux layers without layer 2."""
    from specheads.verifier import Verifier

    return Verifier(model=make_model("llama", seed=6, layers=6), tokenizer=None, name="tiny-llama-6layers")


def target_states(verifier, ids):
    with torch.no_grad():
        return [h[0] for h in verifier.model(input_ids=ids[None], output_hidden_states=True).hidden_states]


@pytest.mark.parametrize("verifier_fn, aux, draft_vocab", [
    (deep_llama, [3, 1, 2], 40),  # ids out of order, a draft vocabulary (d2t)
    (llama6, [5, 2, 3], None),  # the full vocabulary (no d2t)
])
def test_eagle3_sglang_folder_is_what_sglang_reads(tmp_path, verifier_fn, aux, draft_vocab):
    from specheads.drafters.eagle3 import save_eagle3

    verifier = verifier_fn()
    model = eagle3_model(verifier, aux=aux, draft_vocab=draft_vocab)
    save_eagle3(tmp_path / "ckpt", model, verifier)
    export = export_drafter(tmp_path / "ckpt", tmp_path / "sglang", format="sglang", verifier=verifier)
    assert (export.format, export.method) == ("sglang", "eagle3")
    config, tensors = exported(tmp_path / "sglang")
    V, Vd, cfg = verifier.vocab_size, draft_vocab or verifier.vocab_size, model.config
    missing = sorted(set(SGLANG_CONFIG_READS) - set(config))
    assert not missing, f"SGLang would default {missing}"
    for key, value in SGLANG_CONFIG_READS.items():
        if value is not None:
            assert config[key] == value, key
    assert (config["vocab_size"], config["draft_vocab_size"], config["target_hidden_size"], config["hidden_size"]) == (V, Vd, H, H)
    assert (config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]) == (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert config["rope_theta"] == cfg.rope_parameters["rope_theta"] and config["rope_scaling"] is None  # default rope
    assert config["eagle_config"]["use_aux_hidden_state"] is True
    # every SGLang version captures the layers the drafter was trained on; vLLM reads the top-level ids first
    for old in (True, False):
        assert sglang_capture(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"], before_pr_25454=old) == sorted(aux)
    assert config["eagle_aux_hidden_state_layer_ids"] == sorted(aux)
    # weights: midlayer.*, fc, norm, a present lm_head (SGLang leaves a missing one random), d2t for a draft vocabulary
    expected = {"fc.weight", "norm.weight", "lm_head.weight"} | {f"midlayer.{n}.weight" for n in SGLANG_LAYER_WEIGHTS}
    if draft_vocab:
        expected |= {"d2t", "t2d"}
    assert set(tensors) == expected and not any("embed_tokens" in k for k in tensors)
    hd, I = cfg.head_dim, cfg.intermediate_size
    shapes = {"fc.weight": (H, 3 * config["target_hidden_size"]), "lm_head.weight": (Vd, H), "norm.weight": (H,),
              "midlayer.self_attn.q_proj.weight": (cfg.num_attention_heads * hd, 2 * H),
              "midlayer.self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, 2 * H),
              "midlayer.self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, 2 * H),
              "midlayer.self_attn.o_proj.weight": (H, cfg.num_attention_heads * hd),
              "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H), "midlayer.mlp.down_proj.weight": (H, I)}
    assert {k: tuple(tensors[k].shape) for k in shapes} == shapes
    if draft_vocab:
        hot = torch.arange(Vd) + tensors["d2t"]  # SGLang's hot_token_id
        assert tensors["d2t"].dtype == torch.int64 and hot.unique().numel() == Vd and 0 <= int(hot.min()) and int(hot.max()) < V
    # the numbers SGLang computes from the folder (its capture, its one layer) == specheads' drafter
    ids = torch.tensor([5, 9, 13, 7, 30, 22, 11, 40, 3])
    hs = target_states(verifier, ids)
    with torch.no_grad():
        ours_logits, ours_pre = specheads_eagle3_forward(model, verifier, ids, hs)
        capture = sglang_capture(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"], before_pr_25454=False)
        theirs_logits, theirs_pre = vllm_eagle3_forward(config, tensors, verifier.model.get_input_embeddings(), hs, ids, capture=capture)
    torch.testing.assert_close(theirs_pre, ours_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-5, atol=1e-5)
    # and the folder is the vllm format's, tensor for tensor
    export_vllm(tmp_path / "ckpt", tmp_path / "vllm", verifier=verifier)
    vllm_tensors = exported(tmp_path / "vllm")[1]
    assert set(vllm_tensors) == set(tensors) and all(torch.equal(vllm_tensors[k], tensors[k]) for k in tensors)


def test_sglang_rope_scaling_is_the_verifiers(tmp_path):
    """A scaled rope (Llama-3 style) is written as rope_scaling, which transformers reads back."""
    from transformers import LlamaConfig

    from specheads.drafters.eagle3 import Eagle3Config, Eagle3Model, save_eagle3

    verifier = llama6()
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    cfg = Eagle3Config.from_verifier(verifier, verifier.vocab_size, [1, 2, 3])
    cfg.rope_parameters = rope
    save_eagle3(tmp_path / "ckpt", Eagle3Model(cfg), verifier)
    export_drafter(tmp_path / "ckpt", tmp_path / "sglang", format="sglang")
    config = exported(tmp_path / "sglang")[0]
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert LlamaConfig(**{k: v for k, v in config.items() if k != "rope_parameters"}).rope_parameters["factor"] == 8.0


@pytest.mark.parametrize("verifier_fn, aux, num_layers, named", [
    (deep_llama, [1, 2, 3], 2, "reads one"),  # SGLang refuses num_hidden_layers != 1
    (deep_llama, [1, 2], 1, "exactly 3"),  # fc is Linear(3 * target_hidden_size, ...)
    (llama6, [1, 3, 4], 1, "layer 2"),  # no list is read alike before and after SGLang PR #25454
    (deep_llama, [1, 2, 4], 1, "aux layer id 4"),  # the final-norm feature, as for vLLM
])
def test_eagle3_sglang_refusals(tmp_path, verifier_fn, aux, num_layers, named):
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(verifier_fn(), aux=aux, draft_vocab=30, num_layers=num_layers), verifier_fn())
    with pytest.raises(SpecHeadsError, match=named):
        export_drafter(tmp_path / "ckpt", tmp_path / "sglang", format="sglang")
    assert not (tmp_path / "sglang").exists()


def test_draft_model_sglang_folder_is_the_vllm_folder(tmp_path):
    save_draft_model(tmp_path / "student")
    export = export_drafter(tmp_path / "student", tmp_path / "sglang", format="sglang")
    assert (export.format, export.method) == ("sglang", "draft_model")
    export_vllm(tmp_path / "student", tmp_path / "vllm")
    assert sorted(p.name for p in (tmp_path / "sglang").iterdir()) == sorted(p.name for p in (tmp_path / "vllm").iterdir())
    assert exported(tmp_path / "sglang")[0] == exported(tmp_path / "vllm")[0]


# -- EAGLE-3 in vLLM's speculators format (--format speculators) ---------------------------------
def vllm_speculators_config(config: dict) -> tuple[dict, dict]:
    """vLLM 0.32's reading of a speculators config.json, restated from
    vllm/transformers_utils/configs/speculators/{base,algos}.py: (the speculative config it
    builds, the draft model config it builds)."""
    spec = config["speculators_config"]
    assert config["speculators_model_type"] == "eagle3" and "model_type" not in config  # no model_type: "speculators"
    speculative = {"method": config["speculators_model_type"], "num_speculative_tokens": spec["proposal_methods"][0]["speculative_tokens"],
                   "verifier": spec["verifier"]["name_or_path"]}
    draft = dict(config["transformer_layer_config"])
    draft["draft_vocab_size"] = config.get("draft_vocab_size")
    draft["target_hidden_size"] = config["target_hidden_size"]
    draft["norm_before_residual"] = config.get("norm_before_residual", True)
    for key in ("norm_before_fc", "fc_norm", "norm_output"):
        draft[key] = config.get(key, False)
    draft["architectures"] = [{"llama": "Eagle3LlamaForCausalLM", "qwen3": "Eagle3Qwen3ForCausalLM"}[draft.get("model_type", "llama")]]
    draft["eagle_aux_hidden_state_layer_ids"] = config["eagle_aux_hidden_state_layer_ids"]
    return speculative, draft


@pytest.mark.parametrize("aux, draft_vocab, num_layers", [([3, 1, 2], 40, 1), ([2, 1], None, 2)])
def test_eagle3_speculators_folder_is_what_vllm_reads(tmp_path, aux, draft_vocab, num_layers):
    from specheads.drafters.eagle3 import save_eagle3

    verifier = deep_llama()
    model = eagle3_model(verifier, aux=aux, draft_vocab=draft_vocab, num_layers=num_layers)
    save_eagle3(tmp_path / "ckpt", model, verifier)
    (tmp_path / "verifier").mkdir()
    (tmp_path / "verifier" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    export = export_drafter(tmp_path / "ckpt", tmp_path / "spec", format="speculators", verifier=verifier,
                            verifier_path=str(tmp_path / "verifier"), num_speculative_tokens=5)
    assert (export.format, export.method, export.verifier) == ("speculators", "eagle3", str(tmp_path / "verifier"))
    config, tensors = exported(tmp_path / "spec")
    speculative, draft = vllm_speculators_config(config)
    assert speculative == {"method": "eagle3", "num_speculative_tokens": 5, "verifier": str(tmp_path / "verifier")}
    assert config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]  # the named folder's
    V, Vd = verifier.vocab_size, draft_vocab or verifier.vocab_size
    # every field vLLM would otherwise default, with specheads' values (norm_before_residual defaults to true here)
    for key in ("draft_vocab_size", "target_hidden_size", "norm_before_residual", "norm_before_fc", "fc_norm", "norm_output",
                "eagle_aux_hidden_state_layer_ids"):
        assert key in config, key
    assert (draft["draft_vocab_size"], draft["target_hidden_size"], draft["vocab_size"], draft["num_hidden_layers"]) == (Vd, H, V, num_layers)
    assert draft["norm_before_residual"] is False and draft["architectures"] == ["Eagle3LlamaForCausalLM"]
    assert draft["num_aux_hidden_states"] == len(aux) and draft["eagle_aux_hidden_state_layer_ids"] == sorted(aux)
    assert draft["rope_parameters"] == model.config.rope_parameters and draft["tie_word_embeddings"] is False
    # weights as the speculators converter names them: layers.{i}.*, no midlayer, no embedding
    expected = {"fc.weight", "norm.weight", "lm_head.weight"} | {f"layers.{i}.{n}.weight" for i in range(num_layers) for n in SGLANG_LAYER_WEIGHTS}
    if draft_vocab:
        expected |= {"d2t", "t2d"}
    assert set(tensors) == expected
    ids = torch.tensor([5, 9, 13, 7, 30, 22, 11, 40, 3])
    hs = target_states(verifier, ids)
    with torch.no_grad():
        ours_logits, ours_pre = specheads_eagle3_forward(model, verifier, ids, hs)
        theirs_logits, theirs_pre = vllm_eagle3_forward({**draft, "eagle_config": {}}, tensors, verifier.model.get_input_embeddings(), hs, ids,
                                                        capture=draft["eagle_aux_hidden_state_layer_ids"], first_layer="layers.0")
    torch.testing.assert_close(theirs_pre, ours_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-5, atol=1e-5)


def test_speculators_verifier_defaults_to_the_recorded_one(tmp_path, monkeypatch):
    """The checkpoint's verifier by default: an alias becomes its converted folder (vLLM knows no
    specheads alias), a local folder an absolute path, anything else (a hub id) stays."""
    import specheads.verifier as verifier_module
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(deep_llama(), aux=[1, 2, 3], draft_vocab=30), deep_llama())
    assert export_drafter(tmp_path / "ckpt", tmp_path / "a", format="speculators").verifier == "tiny-llama-4layers"
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["specheads"]["verifier"]["name"] = "smollm2-135m"  # as a checkpoint trained for the alias records it
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    converted = tmp_path / "cache" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    monkeypatch.setattr(verifier_module, "converted_alias_dir", lambda alias: converted)
    export = export_drafter(tmp_path / "ckpt", tmp_path / "b", format="speculators")
    verifier = exported(tmp_path / "b")[0]["speculators_config"]["verifier"]
    assert export.verifier == str(converted) and verifier == {"name_or_path": str(converted), "architectures": ["LlamaForCausalLM"]}


@pytest.mark.parametrize("kind, fmt, named", [
    ("medusa", "sglang", "SGLang has no Medusa"),
    ("medusa", "speculators", "vLLM 0.32.s speculators format knows eagle3"),
    ("draft_model", "speculators", "vLLM 0.32.s speculators format knows eagle3"),
])
def test_kinds_an_engine_cannot_serve_are_refused(llama, tmp_path, kind, fmt, named):
    if kind == "medusa":
        save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=2), llama)
    else:
        save_draft_model(tmp_path / "ckpt")
    with pytest.raises(SpecHeadsError, match=f"cannot serve: {named}"):
        export_drafter(tmp_path / "ckpt", tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()


def test_bad_format_and_token_count_are_refused(llama, tmp_path):
    save_medusa(tmp_path / "ckpt", random_heads(llama, num_heads=2), llama)
    with pytest.raises(SpecHeadsError, match="export format 'tensorrt' is not one of vllm, sglang, speculators"):
        export_drafter(tmp_path / "ckpt", tmp_path / "out", format="tensorrt")
    with pytest.raises(SpecHeadsError, match="num_speculative_tokens=0"):
        export_drafter(tmp_path / "ckpt", tmp_path / "out", num_speculative_tokens=0)
    assert not (tmp_path / "out").exists()


def test_cli_export_sglang_and_speculators(tmp_path, capsys):
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(deep_llama(), aux=[1, 2, 3], draft_vocab=30), deep_llama())
    assert cli_main(["export", "--format", "sglang", "--num-speculative-tokens", "4", str(tmp_path / "ckpt"), str(tmp_path / "sglang")]) == 0
    out = capsys.readouterr().out
    assert (f"python -m sglang.launch_server --model-path VERIFIER_DIR --speculative-algorithm EAGLE3 --speculative-draft-model-path "
            f"{tmp_path / 'sglang'} --speculative-num-steps 4 --speculative-eagle-topk 1 --speculative-num-draft-tokens 5") in out
    assert '"method": "eagle3"' in out and "what SGLang does not do" in out
    assert cli_main(["export", "--format", "speculators", "--verifier-path", "org/verifier", str(tmp_path / "ckpt"), str(tmp_path / "spec")]) == 0
    out = capsys.readouterr().out
    assert f"--model {tmp_path / 'spec'}" in out and "verifier org/verifier" in out
    assert exported(tmp_path / "spec")[0]["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert cli_main(["export", "--verifier-path", "org/verifier", str(tmp_path / "ckpt"), str(tmp_path / "vllm")]) == 2
    assert "--verifier-path names the verifier in a speculators folder" in capsys.readouterr().err
    assert cli_main(["export", "--format", "sglang", f"{tmp_path / 'ckpt'}+ngram", str(tmp_path / "sglang")]) == 0
    assert "the n-gram part: SGLang runs one speculative algorithm per server" in capsys.readouterr().out


# -- the real vLLM, where its venv is here ------------------------------------------------------
VLLM_PYTHON = os.environ.get("SPECHEADS_VLLM_PYTHON", str(Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"))
VLLM_READS = """
import json, sys
from vllm.transformers_utils.config import get_config, maybe_override_with_speculators
from vllm.transformers_utils.configs.eagle import EAGLEConfig
spec_dir, sglang_dir = sys.argv[1:]
model, _, speculative = maybe_override_with_speculators(model=spec_dir, tokenizer=None, trust_remote_code=False)
keys = ("architectures", "draft_vocab_size", "target_hidden_size", "norm_before_residual", "norm_before_fc", "fc_norm",
        "norm_output", "eagle_aux_hidden_state_layer_ids", "num_aux_hidden_states", "num_hidden_layers", "vocab_size", "head_dim")
spec = get_config(spec_dir, trust_remote_code=False)
sglang = EAGLEConfig(get_config(sglang_dir, trust_remote_code=False), method="eagle3", model_type="eagle")
print(json.dumps({"model": model, "speculative": speculative, "speculators": {k: getattr(spec, k, None) for k in keys},
                  "sglang": {k: getattr(sglang, k, None) for k in keys}}))
"""


def _vllm_imports() -> bool:
    return Path(VLLM_PYTHON).is_file() and subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _vllm_imports(), reason="no python with vllm here (.venv-vllm, or $SPECHEADS_VLLM_PYTHON)")
def test_vllm_reads_the_speculators_and_sglang_folders(tmp_path):
    """vLLM 0.32's own config code on both folders (10 to 20 s, most of it importing vllm)."""
    from specheads.drafters.eagle3 import save_eagle3

    save_eagle3(tmp_path / "ckpt", eagle3_model(deep_llama(), aux=[3, 1, 2], draft_vocab=40), deep_llama())
    export_drafter(tmp_path / "ckpt", tmp_path / "spec", format="speculators", verifier_path="org/verifier", num_speculative_tokens=4)
    export_drafter(tmp_path / "ckpt", tmp_path / "sglang", format="sglang")
    run = subprocess.run([VLLM_PYTHON, "-c", VLLM_READS, str(tmp_path / "spec"), str(tmp_path / "sglang")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["model"] == "org/verifier"
    assert seen["speculative"] == {"method": "eagle3", "num_speculative_tokens": 4, "model": str(tmp_path / "spec")}
    common = {"draft_vocab_size": 40, "target_hidden_size": H, "norm_before_residual": False, "norm_before_fc": False,
              "fc_norm": False, "norm_output": False, "eagle_aux_hidden_state_layer_ids": [1, 2, 3], "num_aux_hidden_states": 3,
              "num_hidden_layers": 1, "vocab_size": deep_llama().vocab_size, "head_dim": 8}
    assert seen["speculators"] == {**common, "architectures": ["Eagle3LlamaForCausalLM"]}
    assert seen["sglang"] == {**common, "architectures": ["LlamaForCausalLMEagle3"]}
