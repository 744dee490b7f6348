"""Bad input, one table: each case is a SpecHeadsError whose message names the bad value (the CLI
prints it as one line and exits 2), and leaves no output folder behind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from conftest import VOCAB, cached_verifier
from specheads.cli import main
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.candidates import Candidates
from specheads.decoding.sampling import SamplingParams
from specheads.drafters import build_drafter
from specheads.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads, load_medusa_heads, save_medusa
from specheads.errors import SpecHeadsError
from specheads.verifier import Verifier, load_verifier
from tiny_text import VOCAB_SIZE, char_tokenizer


def tiny_llama(seed: int = 0, vocab: int = VOCAB_SIZE) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A verifier folder the CLI loads, and a good Medusa drafter for it to spoil per case."""
    root = tmp_path_factory.mktemp("table")
    tiny_llama(0).save_pretrained(root / "verifier")
    char_tokenizer().save_pretrained(root / "verifier")
    verifier = load_verifier(str(root / "verifier"), device="cpu")
    save_medusa(root / "medusa", MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=VOCAB_SIZE, num_heads=2)), verifier)
    return root


# -- spoiled drafter folders: (folder) -> None, starting from a copy of the good Medusa drafter ----
def edit_json(folder, change: Callable[[dict], object], replace: bool = False) -> None:
    """Edit config.json in place with ``change``, or (replace) write what it returns instead."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    replaced = change(config)
    path.write_text(json.dumps(replaced if replace else config))


def hyper(change):
    return lambda f: edit_json(f, lambda c: change(c["specheads"]["hyper_parameters"]))


def draft_model(folder, weights: str = "safetensors") -> None:
    """A plain draft model folder: safetensors, or only a pickled .bin."""
    import shutil

    shutil.rmtree(folder)
    model = tiny_llama(1)
    if weights == "safetensors":
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


def wrong_shape(folder) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["blocks.0.layers.0.weight"] = torch.zeros(16, 16)
    save_file(tensors, folder / "model.safetensors")


def no_model_type(folder) -> None:
    draft_model(folder)
    edit_json(folder, lambda c: c.pop("model_type"))


DRAFTERS: dict[str, Callable] = {
    "config_is_a_list": lambda f: edit_json(f, lambda c: [c], replace=True),
    "specheads_is_a_string": lambda f: edit_json(f, lambda c: c.update(specheads="x")),
    "kind_is_a_list": lambda f: edit_json(f, lambda c: c["specheads"].update(drafter_kind=["medusa"])),
    "kind_missing": lambda f: edit_json(f, lambda c: c["specheads"].update(kind=c["specheads"].pop("drafter_kind"))),
    "unknown_hyper_parameter": hyper(lambda hp: hp.update(num_headz=3)),
    "missing_hyper_parameter": hyper(lambda hp: hp.pop("hidden_size")),
    "hyper_parameter_of_wrong_type": hyper(lambda hp: hp.update(num_heads="four")),
    "hyper_parameter_for_another_verifier": hyper(lambda hp: hp.update(vocab_size=999)),
    "tensor_of_wrong_shape": wrong_shape,
    "no_verifier_block": lambda f: edit_json(f, lambda c: c["specheads"].pop("verifier")),
    "verifier_block_without_lm_head_hash": lambda f: edit_json(f, lambda c: c["specheads"]["verifier"].pop("lm_head_sha256")),
    "medusa_weights_not_safetensors": lambda f: (f / "model.safetensors").write_bytes(b"not safetensors at all"),
    "draft_model_only_bin": lambda f: draft_model(f, weights="bin"),
    "draft_model_no_model_type": no_model_type,
    "draft_model_weights_not_safetensors": lambda f: (draft_model(f), (f / "model.safetensors").write_bytes(b"\x08garbage")),
}


@dataclass
class Case:
    id: str
    argv: list[str] | None = None  # a CLI call (DRAFTER, VERIFIER and OUT are filled in) ...
    call: Callable | None = None  # ... or a Python call (given the root folder and the drafter path)
    drafter: str | None = None  # a DRAFTERS entry to build at DRAFTER
    names: list[str] = field(default_factory=list)  # what the message must contain: the bad value


def generate(*extra: str) -> list[str]:
    return ["generate", "--verifier", "VERIFIER", "--device", "cpu", "--cpu-linears", "packed", "--prompt", "hello",
            "--max-new-tokens", "2", "--tree", "chain", *extra]


def with_tree(model, name):
    verifier = Verifier(model.eval(), None, name)
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=VOCAB, num_heads=3))
    SpeculativeDecoder(verifier, MedusaDrafter(heads, verifier, tree="tree4"))


def chunked_attention_with_tree(root, drafter):
    """Llama-4's chunked attention: tree masks are not built for it (sliding windows are)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_chunk_size=16)
    with_tree(Llama4ForCausalLM(cfg), "tiny-llama4")


def sliding_window_with_tree_without_rollback(root, drafter):
    """A transformers whose sliding-window cache cannot keep positions for a rollback (before
    activate_past_recording): trees past the window could not be taken back."""
    from unittest import mock

    from transformers.cache_utils import DynamicSlidingWindowLayer

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, sliding_window=16)
    with mock.patch.object(DynamicSlidingWindowLayer, "activate_past_recording", None):
        with_tree(MistralForCausalLM(cfg), "tiny-mistral")


CASES = [
    # sampling settings, refused before anything loads
    Case("cli_temperature_nan", argv=generate("--temperature", "nan"), names=["temperature", "nan"]),
    Case("cli_temperature_inf", argv=generate("--temperature", "inf"), names=["temperature", "inf"]),
    Case("cli_top_k_negative", argv=generate("--top-k", "-3"), names=["top_k", "-3"]),
    Case("cli_top_p_zero", argv=generate("--top-p", "0"), names=["top_p must be in (0, 1] (1 = off), got 0.0"]),
    Case("cli_bench_temperature_nan", argv=["bench", "--verifier", "VERIFIER", "--temperature", "nan", "--output", "OUT"], names=["nan"]),
    Case("api_temperature_nan", call=lambda r, d: SamplingParams(temperature=float("nan")), names=["temperature", "nan"]),
    Case("api_temperature_inf", call=lambda r, d: SamplingParams(temperature=float("-inf")), names=["temperature", "-inf"]),
    Case("api_temperature_string", call=lambda r, d: SamplingParams(temperature="0.7"), names=["temperature", "'0.7'"]),
    Case("api_top_k_fraction", call=lambda r, d: SamplingParams(temperature=1, top_k=2.5), names=["top_k", "2.5"]),
    Case("api_top_k_negative", call=lambda r, d: SamplingParams(temperature=1, top_k=-4), names=["top_k", "-4"]),
    # drafter folders through the CLI
    *[Case(f"cli_{name}", argv=generate("--drafter", "DRAFTER"), drafter=name, names=names) for name, names in [
        ("config_is_a_list", ["config.json", "list"]),
        ("specheads_is_a_string", ["'specheads'", "'x'"]),
        ("kind_is_a_list", ["drafter_kind", "['medusa']"]),
        ("kind_missing", ["drafter_kind", "None"]),
        ("unknown_hyper_parameter", ["num_headz"]),
        ("missing_hyper_parameter", ["missing keys ['hidden_size']"]),
        ("hyper_parameter_of_wrong_type", ["num_heads", "'four'"]),
        ("hyper_parameter_for_another_verifier", ["vocab_size=999"]),
        ("tensor_of_wrong_shape", ["blocks.0.layers.0.weight", "(16, 16)"]),
        ("no_verifier_block", ["records no verifier", "'specheads.verifier'"]),
        ("verifier_block_without_lm_head_hash", ["without 'lm_head_sha256'"]),
        ("medusa_weights_not_safetensors", ["model.safetensors", "corrupt"]),
        ("draft_model_only_bin", ["pytorch_model.bin", "no .safetensors"]),
        ("draft_model_no_model_type", ["model_type"]),
        ("draft_model_weights_not_safetensors", ["model.safetensors", "not valid safetensors"]),
    ]],
    Case("cli_bench_bad_drafter", argv=["bench", "--verifier", "VERIFIER", "--device", "cpu", "--cpu-linears", "packed", "--no-hf",
                                        "--drafter", "DRAFTER", "--output", "OUT"], drafter="unknown_hyper_parameter", names=["num_headz"]),
    Case("cli_export_config_is_a_list", argv=["export", "DRAFTER", "OUT"], drafter="config_is_a_list", names=["config.json", "list"]),
    # the Python API
    Case("api_build_drafter_kind_is_a_list", call=lambda r, d: build_drafter(d, cached_verifier("llama", 0)),
         drafter="kind_is_a_list", names=["['medusa']"]),
    Case("api_load_medusa_heads_wrong_type", call=lambda r, d: load_medusa_heads(d), drafter="hyper_parameter_of_wrong_type",
         names=["num_heads", "'four'"]),
    Case("api_candidates_parent_below_minus_one",
         call=lambda r, d: Candidates(torch.tensor([3, 4, 5]), torch.tensor([-1, -2, 0])), names=["-2"]),
    Case("api_chunked_attention_verifier_with_tree", call=chunked_attention_with_tree, names=["'chunked_attention'", "chunks of 16 tokens", "tree"]),
    Case("api_sliding_window_verifier_with_tree_without_rollback", call=sliding_window_with_tree_without_rollback,
         names=["sliding-window", "window 16", "activate_past_recording", "tree"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, root, tmp_path, capsys):
    drafter = tmp_path / "drafter"
    if case.drafter:
        import shutil

        shutil.copytree(root / "medusa", drafter)
        DRAFTERS[case.drafter](drafter)
    out = tmp_path / "out"
    if case.argv is not None:
        subs = {"VERIFIER": str(root / "verifier"), "DRAFTER": str(drafter), "OUT": str(out)}
        assert main([subs.get(a, a) for a in case.argv]) == 2
        err = capsys.readouterr().err
        message = err.rstrip("\n").split("\n")[-1]  # after any loading progress bars
        assert message.startswith("specheads: error: ") and "Traceback" not in err, err
    else:
        with pytest.raises(SpecHeadsError) as exc:
            case.call(root, str(drafter))
        message = str(exc.value)
    for name in case.names:
        assert name in message, (name, message)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["drafter"] if case.drafter else [])


def test_the_table_is_large_enough():
    assert len(CASES) >= 20


# -- not errors: accepted and made safe --------------------------------------------------------
def test_an_integer_temperature_is_a_float():
    params = SamplingParams(temperature=2, top_k=3)
    assert params.temperature == 2.0 and isinstance(params.temperature, float)
    probs = params.probs(torch.randn(2, VOCAB))  # transformers' temperature warper refuses an int
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert SamplingParams(temperature=1).temperature == 1.0


class Vandal:
    """Drafts nothing, but empties and scribbles on the token list it is handed."""

    name = "vandal"
    needs_hidden_states = False

    def start(self, prompt_ids):
        pass

    def propose(self, ctx):
        ctx.tokens.clear()
        ctx.tokens.extend([3, 3, 3])
        return Candidates.empty()

    def observe(self, num_accepted, emitted):
        pass


def test_a_drafter_editing_ctx_tokens_cannot_change_the_output():
    verifier = cached_verifier("llama", 0)
    prompt = [5, 9, 13, 5, 9]
    plain = SpeculativeDecoder(verifier).generate(prompt, max_new_tokens=8)
    vandal = SpeculativeDecoder(verifier, Vandal(), control="fixed").generate(prompt, max_new_tokens=8)
    assert vandal.token_ids == plain.token_ids


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_tree_drafter_switches_an_untested_attention_to_sdpa():
    import copy

    verifier = cached_verifier("llama", 0)
    model = copy.deepcopy(verifier.model)
    model.config._attn_implementation_internal = "flex_attention"  # as if loaded with it
    tuned = Verifier(model, None, "tiny-llama-flex")
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=VOCAB, num_heads=3))
    with pytest.warns(UserWarning, match="'flex_attention' switched to 'sdpa'"):
        SpeculativeDecoder(tuned, MedusaDrafter(heads, tuned, tree="tree4"), control="fixed")
    assert model.config._attn_implementation == "sdpa"
    # a chain needs no 4D mask: left as it is
    model.config._attn_implementation_internal = "flex_attention"
    SpeculativeDecoder(tuned, MedusaDrafter(heads, tuned, tree="chain"), control="fixed")
    assert model.config._attn_implementation == "flex_attention"
