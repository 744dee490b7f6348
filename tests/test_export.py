"""`specheads export --format vllm`: the folders vLLM's loaders take, exact round trips, refusals.

vLLM itself is not needed here (scripts/vllm_interop.sh checks the folders against the real
engine); these tests pin the layout its loaders read: vLLM's Medusa config renames keys containing
"num" + "heads"/"layers", reads the block bias only with ``medusa_fc_bias``, a shared head only
with ``original_lm_head`` as ``lm_heads.0.weight``, and builds own heads over the full vocabulary.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from specheads.cli import main as cli_main
from specheads.drafters.medusa import MedusaConfig, MedusaHeads, save_medusa
from specheads.errors import SpecHeadsError
from specheads.export import VLLM_EXPORTERS, check_vllm_medusa_config, export_vllm

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


def vllm_eagle3_forward(config, tensors, embed, hidden_states, input_ids):
    """vLLM's Eagle3LlamaForCausalLM over one sequence: row t reads the target's features at t
    and the token input_ids[t]; returns (target-vocabulary logits [T, V], pre-norm output [T, H])."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    eps, H = config["rms_norm_eps"], config["hidden_size"]
    layer_ids = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    captured = [hidden_states[k] for k in range(len(hidden_states)) if k in layer_ids]  # layer order
    h = torch.cat(captured, -1) @ tensors["fc.weight"].T
    T = h.shape[0]
    embeds = embed(input_ids)
    llama = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "eagle_config")})
    cos, sin = LlamaRotaryEmbedding(llama)(h[None], torch.arange(T)[None])
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    residual = None
    for li in range(config["num_hidden_layers"]):
        w = lambda n: tensors[("midlayer." if li == 0 else f"layers.{li}.") + n]  # noqa: E731 (vLLM renames midlayer -> layers.0)
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
