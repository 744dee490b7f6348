"""Every shipped recipe, proven on its tiny twin (``specheads train --recipe R --tiny-twin``).

Each recipe in recipes/ parses and validates; each one for a hub model names, in its header, an
accelerate config that exists and a marked plan line. Each runs on a random scaled-down twin of
its verifier (the architecture class read from the real config, shipped or cached): data -> a few
steps -> save -> load -> greedy decoding, speculative against plain, token for token in float32.
A recipe for an architecture specheads cannot train fails here. The twin's own pieces (scaled
config, tokenizer, where the config is read) and the hub-id student are tested alone.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path

import pytest
import torch

from specheads.errors import SpecHeadsError
from specheads.tiny_twin import (
    MARKER, VERIFIER_SHAPE, RealConfig, build_twin, real_config, run_tiny_twin, scaled_config, shipped_configs, twin_tokenizer,
)
from specheads.training.recipe import load_recipe
from specheads.verifier import ALIASES

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "*.yaml")))


def _id(path: str) -> str:
    return Path(path).stem


def _header(path: str) -> str:
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_the_recipes_are_found():
    names = {_id(p) for p in RECIPES}
    assert {"llama3.1-8b_eagle3", "qwen3-8b_eagle3", "qwen3-30b-a3b_eagle3", "qwen3-8b_distill_qwen3-0.6b",
            "llama3.1-8b_medusa1", "smollm2_eagle3_quick"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_parses_validates_and_its_header_names_what_exists(path):
    recipe = load_recipe(path)
    header = _header(path)
    configs = re.findall(r"--config_file\s+(\S+)", header)
    for config in configs:
        assert (ROOT / config).is_file(), f"{_id(path)}: its header names {config}, which does not exist"
    if recipe.verifier.name not in ALIASES:  # a hub model: an 8-GPU launch, a plan line, the twin's command
        assert configs, f"{_id(path)}: a hub recipe's header must name an accelerate config (--config_file ...)"
        assert re.search(r"^# Plan \(8x H100 80GB\): \S", header, re.M), f"{_id(path)}: no '# Plan (8x H100 80GB): ...' line"
        assert f"--recipe recipes/{Path(path).name} --tiny-twin" in header
        assert recipe.training.cache_hidden_states is False  # features online from the verifier
        assert not isinstance(recipe.data.self_distill.prompts, str) or "/" in recipe.data.self_distill.prompts


# -- every recipe on its twin ------------------------------------------------------------------------
@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_trains_saves_loads_and_decodes_losslessly_on_its_tiny_twin(path, tmp_path, capsys):
    recipe = load_recipe(path)
    out = tmp_path / "twin"
    summary = run_tiny_twin(path, [], str(out), progress=False)
    printed = capsys.readouterr()

    # lossless greedy decoding, per prompt, printed and recorded
    assert summary["status"] == "lossless" and len(summary["decoding"]) == 3
    assert all(r["identical"] and r["tokens"] >= 1 for r in summary["decoding"]), summary["decoding"]
    assert printed.out.count("speculative == plain greedy: True") == 3
    assert json.loads((out / MARKER).read_text())["status"] == "lossless"

    # the twin is the recipe's architecture class, scaled down, saved as a plain safetensors folder
    real = real_config(recipe.verifier.name)
    twin = json.loads((out / "verifier" / "config.json").read_text())
    assert twin["model_type"] == real.config["model_type"]
    assert twin["architectures"] == real.config.get("architectures", twin["architectures"])
    assert twin["hidden_size"] == VERIFIER_SHAPE.hidden_size and twin["vocab_size"] == VERIFIER_SHAPE.vocab_size
    assert twin["tie_word_embeddings"] == real.config.get("tie_word_embeddings", twin["tie_word_embeddings"])
    names = os.listdir(out / "verifier")
    assert "model.safetensors" in names and "tokenizer.json" in names and not any(n.endswith(".bin") for n in names)

    # the drafter the recipe asks for, trained the recipe's way: only sizes and what cannot run here differ
    drafter = json.loads((Path(summary["drafter"]) / "config.json").read_text())
    assert drafter["specheads"]["drafter_kind"] == recipe.drafter.kind
    trained = json.loads((out / "train" / "training_summary.json").read_text())
    assert trained["steps"] == min(recipe.training.max_steps, 3)
    ran, asked = trained["recipe"], dataclasses.asdict(recipe)
    sized = {"on_policy_max_new_tokens"}
    assert {k: v for k, v in ran["objective"].items() if k not in sized} == {k: v for k, v in asked["objective"].items() if k not in sized}
    for key in ("kind", "num_heads", "num_layers", "shared_lm_head", "aux_layer_ids"):
        assert ran["drafter"][key] == asked["drafter"][key], key
    for key in ("lr", "weight_decay", "dtype", "seed", "group_by_length", "cache_hidden_states", "max_grad_norm"):
        assert ran["training"][key] == asked["training"][key], key
    assert ran["verifier"]["dtype"] == asked["verifier"]["dtype"]
    if recipe.drafter.kind == "eagle3":  # vLLM's default aux layers (2, N // 2, N - 3) of the 8-layer twin
        assert drafter["specheads"]["hyper_parameters"]["aux_layer_ids"] == (recipe.drafter.aux_layer_ids or [2, 4, 5])

    # what the twin swapped is said on stderr
    if recipe.verifier.name not in ALIASES:
        assert "tiny twin: data.self_distill.prompts" in printed.err
        if recipe.data.self_distill.engine != "hf":
            assert f"data.self_distill.engine {recipe.data.self_distill.engine} -> hf" in printed.err
        if getattr(recipe.verifier, "shard", "none") != "none":
            assert f"verifier.shard {recipe.verifier.shard} -> none" in printed.err
    if recipe.drafter.kind == "draft_model" and recipe.drafter.student.source == "model":
        student = json.loads((out / "student" / "config.json").read_text())
        assert student["model_type"] == real_config(recipe.drafter.student.path).config["model_type"]
        assert student["vocab_size"] == twin["vocab_size"] and student["hidden_size"] < twin["hidden_size"]


# -- the twin's pieces -------------------------------------------------------------------------------
def test_shipped_configs_name_the_transformers_class_of_their_model_type():
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    shipped = shipped_configs()
    assert {"meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-0.6B"} <= set(shipped)
    for name, entry in shipped.items():
        c = dict(entry["config"])
        assert entry["source"] and entry["chat_format"] in ("llama3", "chatml"), name
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[c["model_type"]] == c["architectures"][0], name
        config = AutoConfig.for_model(c.pop("model_type"), **c)
        assert config.hidden_size % config.num_attention_heads == 0 or "head_dim" in entry["config"], name


def _scaled(name: str) -> dict:
    real = real_config(name)
    return scaled_config(real.config, shape=VERIFIER_SHAPE, vocab_size=512, bos=None, eos=[2, 3], pad=0)


def test_scaled_qwen3_moe_keeps_its_experts_routing_and_head_shape():
    from transformers import AutoConfig, AutoModelForCausalLM

    c = _scaled("Qwen/Qwen3-30B-A3B")
    # 128 experts top-8 -> 4 top-2; 32 heads of 128 over 2048 (head_dim twice hidden/heads) -> 4 of 32 over 64
    assert (c["num_experts"], c["num_experts_per_tok"], c["num_hidden_layers"]) == (4, 2, 8)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 1, 32)
    assert c["moe_intermediate_size"] == 24 and c["decoder_sparse_step"] == 1 and c["mlp_only_layers"] == []
    assert c["eos_token_id"] == [2, 3] and c["vocab_size"] == 512
    fields = dict(c)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)


def test_scaled_llama3_keeps_its_rope_scaling_and_query_groups():
    c = _scaled("meta-llama/Llama-3.1-8B-Instruct")
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["rope_theta"] == 500000.0
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 1, 16)  # 32/8 groups of 4
    assert c["intermediate_size"] == round(14336 * 64 / 4096) and c["tie_word_embeddings"] is False


def test_a_gpt_oss_twin_keeps_its_sliding_full_layer_pattern(tmp_path):
    from transformers import AutoModelForCausalLM, GptOssConfig

    real = RealConfig("gpt-oss (transformers' defaults)", GptOssConfig().to_dict(), "chatml", "transformers")
    folder = build_twin(real, tmp_path / "gpt-oss")
    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = model.config
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 4
    assert cfg.sliding_window == VERIFIER_SHAPE.sliding_window and cfg.num_local_experts == 4 and cfg.num_experts_per_tok == 2
    assert cfg.num_attention_heads * cfg.head_dim > cfg.hidden_size  # 64 heads x 64 over 2880, scaled alike


@pytest.mark.parametrize("fmt, opening, eos", [
    ("llama3", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
     "<|eot_id|>"),
    ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
])
def test_twin_tokenizer_is_deterministic_and_speaks_the_familys_chat_format(fmt, opening, eos):
    a, b = twin_tokenizer(fmt), twin_tokenizer(fmt)
    assert a.get_vocab() == b.get_vocab() and len(a) == VERIFIER_SHAPE.vocab_size
    text = a.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == opening
    assert a.eos_token == eos and a.pad_token_id is not None and a.pad_token_id != a.eos_token_id
    ids = a("Explain what a hash table is.")["input_ids"]
    assert a.decode(ids, skip_special_tokens=True) == "Explain what a hash table is."
    assert len(ids) < 20  # merges learnt from the bundled prompts: far fewer tokens than bytes


def _fake_hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The Hugging Face cache layout for one repo: refs/main -> snapshots/<commit>/<files>."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_real_config_reads_a_local_folder_or_the_hf_cache_before_the_shipped_copy(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    shipped = shipped_configs()["Qwen/Qwen3-8B"]
    assert real_config("Qwen/Qwen3-8B").where.startswith("specheads/data/hub_configs.json")
    cached = {**shipped["config"], "num_hidden_layers": 5}
    snapshot = _fake_hub_cache(tmp_path / "hub", "Qwen/Qwen3-8B", {"config.json": json.dumps(cached).encode()})
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    found = real_config("Qwen/Qwen3-8B")
    assert found.where == str(snapshot / "config.json") and found.config["num_hidden_layers"] == 5 and found.chat_format == "chatml"
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({**cached, "num_hidden_layers": 3}))
    assert real_config(str(local)).config["num_hidden_layers"] == 3


def test_an_alias_without_its_converted_copy_reads_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECHEADS_CACHE", str(tmp_path / "empty"))
    found = real_config("smollm2-135m")
    assert found.where.startswith("specheads/data/hub_configs.json (HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (found.config["model_type"], found.config["num_hidden_layers"], found.chat_format) == ("llama", 30, "chatml")


def test_hub_conversations_become_self_distilled_bundled_prompts(tmp_path):
    from specheads.tiny_twin import twin_overrides

    base = [f"training.output_dir={tmp_path / 'run'}", "drafter.kind=eagle3", "data.conversations=HuggingFaceH4/ultrachat_200k:train_sft"]
    recipe = load_recipe(None, base)
    assert recipe.data.self_distill is None
    twin = load_recipe(None, base + twin_overrides(recipe, str(tmp_path / "twin"), str(tmp_path / "verifier"), None))
    assert twin.data.conversations is None and twin.data.self_distill.prompts == "default"
    assert twin.data.self_distill.num_prompts == 8 and twin.data.self_distill.output_dir == str(tmp_path / "twin" / "data")
    assert (twin.training.max_steps, twin.training.batch_size, twin.data.max_length) == (3, 2, 128)


@pytest.mark.parametrize("engine", [
    ["data.self_distill.engine=openai", "data.self_distill.endpoints=[http://gpu-node:8000/v1]", "data.self_distill.api_key_env=KEY",
     "data.self_distill.served_model=llama"],
    ["data.self_distill.engine=vllm", "data.self_distill.vllm_args={tensor_parallel_size: 8}"],
])
def test_a_serving_engine_becomes_hf_without_its_settings(tmp_path, engine, capsys):
    from specheads.tiny_twin import twin_overrides

    base = [f"training.output_dir={tmp_path / 'run'}", "drafter.kind=eagle3", *engine]
    recipe = load_recipe(None, base)
    twin = load_recipe(None, base + twin_overrides(recipe, str(tmp_path / "twin"), str(tmp_path / "verifier"), None))
    s = twin.data.self_distill
    assert (s.engine, s.endpoints, s.api_key_env, s.served_model, s.vllm_args) == ("hf", None, None, None, None)
    assert f"engine {recipe.data.self_distill.engine} -> hf" in capsys.readouterr().err


def test_an_unknown_hub_model_or_architecture_is_refused_by_name(tmp_path):
    with pytest.raises(SpecHeadsError, match=r"tiny twin of 'someone/unknown-model'.* ships only .*Qwen/Qwen3-8B"):
        real_config("someone/unknown-model")
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_architecture", "hidden_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4}))
    with pytest.raises(SpecHeadsError, match="cannot build a tiny twin of model_type 'no_such_architecture'"):
        build_twin(real_config(str(folder)), tmp_path / "twin")
    assert not (tmp_path / "twin").exists()


def test_a_folder_that_is_not_a_twin_run_is_never_cleared(tmp_path):
    keep = tmp_path / "mine" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("keep me")
    with pytest.raises(SpecHeadsError, match="is not a tiny-twin run's folder"):
        run_tiny_twin(str(ROOT / "recipes" / "smollm2_medusa1_quick.yaml"), [], str(keep.parent))
    assert keep.read_text() == "keep me"


def test_a_speculative_mismatch_fails_the_command(tmp_path, monkeypatch, capsys):
    """The check can fail: a decoder whose speculative output differs by one token makes
    `specheads train --tiny-twin` exit non-zero, naming the prompt and both outputs."""
    from specheads.cli import main
    from specheads.decoding import engine

    real_generate = engine.SpeculativeDecoder.generate

    def off_by_one(self, *args, **kwargs):
        out = real_generate(self, *args, **kwargs)
        if self.drafter is not None:
            out.token_ids[-1] = (out.token_ids[-1] + 1) % self.model.config.vocab_size
        return out

    monkeypatch.setattr(engine.SpeculativeDecoder, "generate", off_by_one)
    recipe = str(ROOT / "recipes" / "smollm2_medusa1_quick.yaml")
    assert main(["train", "--recipe", recipe, "--tiny-twin", "--output-dir", str(tmp_path / "twin")]) != 0
    err = capsys.readouterr().err
    assert "is not lossless: prompt 0: plain [" in err
    assert main(["train", "--recipe", recipe, "--tiny-twin", "--resume"]) != 0
    assert "--tiny-twin runs the whole recipe from scratch" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--recipe", recipe, "--tiny-twin", "--output-dir", str(tmp_path / "other")]) != 0
    assert "--tiny-twin runs on one process" in capsys.readouterr().err and not (tmp_path / "other").exists()


# -- a hub id as the student ---------------------------------------------------------------------------
def _distill(tmp_path, path: str):
    return load_recipe(None, [f"training.output_dir={tmp_path}", "drafter.kind=draft_model", "drafter.student.source=model",
                              f"drafter.student.path={path}"])


def test_a_hub_student_passes_validation_and_fails_clearly_when_it_cannot_be_reached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    from conftest import cached_verifier
    from specheads.student import check_student

    recipe = _distill(tmp_path, "Qwen/Qwen3-0.6B")
    with pytest.raises(SpecHeadsError, match=r"drafter.student.path='\./missing' is not a model directory .* nor a hub id"):
        _distill(tmp_path, "./missing")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no network attempts (and their retries) in tests
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SpecHeadsError, match=r"student model 'Qwen/Qwen3-0.6B' is no local folder.*Point drafter.student.path at a local copy"):
        check_student(recipe.drafter.student, cached_verifier("llama"))


def test_a_hub_student_loads_from_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    from conftest import cached_verifier, make_model
    from specheads.student import build_student

    model = make_model("qwen2", seed=3)  # the verifier's vocabulary, another family
    folder = tmp_path / "saved"
    model.save_pretrained(folder, safe_serialization=True)
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-student", {f.name: f.read_bytes() for f in folder.iterdir()})
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    student = build_student(_distill(tmp_path, "someone/tiny-student").drafter.student, cached_verifier("llama"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], value)
