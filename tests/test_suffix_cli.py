"""`specheads suffix-index` and `--drafter suffix[:FILE]` end to end on a tiny text model saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.cli import build_parser, main
from specheads.drafters.suffix_index import SuffixArray
from specheads.training.data import generate_self_distillation
from specheads.verifier import load_verifier

from tiny_text import CHARS, SPECIAL, char_tokenizer

PROMPTS = ["what is a hash table?", "write a poem about rain.", "count to ten."]


def save_tiny(path, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(SPECIAL) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("suffix_cli")
    verifier = save_tiny(root / "verifier", 0)
    # The verifier's own answers (self-distilled), as the index's corpus.
    generate_self_distillation(load_verifier(verifier), PROMPTS, root / "sd", max_new_tokens=24, batch_size=3, progress=False)
    conversations = root / "conversations.jsonl"
    conversations.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]})
                                       for p, a in [("hi", "hello there"), ("bye", "see you"), ("x", "y")]))
    questions = root / "questions.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "turns": [p]}) for i, p in enumerate(PROMPTS)))
    return {"root": root, "verifier": verifier, "other": save_tiny(root / "other", 1), "sd": str(root / "sd"),
            "conversations": str(conversations), "questions": str(questions)}


def test_suffix_index_help_names_its_options():
    help_text = build_parser()._subparsers._group_actions[0].choices["suffix-index"].format_help()
    for option in ("--data", "--output", "--num-conversations", "--prompt-tokens", "--sort-depth", "--verifier"):
        assert option in help_text
    assert "suffix:FILE" in help_text


def test_index_a_self_distilled_folder_and_decode_with_it(setup, tmp_path, capsys):
    out = tmp_path / "sd.safetensors"
    assert main(["suffix-index", "--data", setup["sd"], "--output", str(out), "--verifier", setup["verifier"]]) == 0
    assert f"--drafter suffix:{out}" in capsys.readouterr().out
    v = load_verifier(setup["verifier"])
    index = SuffixArray.load(out, v)
    assert index.meta["num_conversations"] == len(PROMPTS) and index.meta["source"] == setup["sd"]
    # The prompts were answered into the corpus: greedy decoding drafts those answers from it.
    from specheads.decoding import SpeculativeDecoder
    from specheads.drafters import build_drafter

    d = build_drafter(f"suffix:{out}", v)
    plain = SpeculativeDecoder(v, None).generate(v.encode(PROMPTS[0]), max_new_tokens=24)
    got = SpeculativeDecoder(v, d, num_draft_tokens=4).generate(v.encode(PROMPTS[0]), max_new_tokens=24)
    assert got.token_ids == plain.token_ids
    assert got.stats.tau > 3.0, got.stats.tau
    assert main(["generate", "--verifier", setup["verifier"], "--drafter", f"suffix:{out}", "--prompt", PROMPTS[1],
                 "--max-new-tokens", "12", "--device", "cpu", "--cpu-linears", "packed"]) == 0


def test_index_conversations_with_a_limit(setup, tmp_path):
    out = tmp_path / "c.safetensors"
    assert main(["suffix-index", "--data", setup["conversations"], "--output", str(out), "--verifier", setup["verifier"],
                 "--num-conversations", "2", "--prompt-tokens", "0"]) == 0
    index = SuffixArray.load(out, load_verifier(setup["verifier"]))
    tok = char_tokenizer()
    assert index.meta["num_conversations"] == 2
    assert "".join(tok.convert_ids_to_tokens(index.tokens[index.tokens >= 0].tolist())) == "hello there<|im_end|>see you<|im_end|>"


def test_bench_puts_suffix_beside_ngram(setup, tmp_path, capsys):
    out = tmp_path / "sd.safetensors"
    assert main(["suffix-index", "--data", setup["sd"], "--output", str(out), "--verifier", setup["verifier"]]) == 0
    args = ["bench", "--verifier", setup["verifier"], "--prompts", setup["questions"], "--max-new-tokens", "16",
            "--device", "cpu", "--cpu-linears", "packed", "--no-hf", "--output", str(tmp_path / "b"), "--tree", "chain"]
    assert main(args + ["--drafter", f"ngram,suffix:{out}"]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    suffix = [n for n in report["methods"] if n.startswith("speculative[suffix:")]
    assert len(suffix) == 1 and report["methods"][suffix[0]]["identical_to_verifier"] is True
    info = {d["kind"]: d for d in report["drafters"]}
    assert info["suffix"]["not_swept"] == ["--tree"] and "sd.safetensors" in info["suffix"]["detail"]
    assert main(args + ["--drafter", "suffix"]) == 0  # no corpus: the run's earlier requests only
    assert json.loads((tmp_path / "b" / "report.json").read_text())["methods"]["speculative"]["identical_to_verifier"] is True


def test_an_index_for_another_verifier_or_a_corrupt_one_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "other.safetensors"
    assert main(["suffix-index", "--data", setup["conversations"], "--output", str(out), "--verifier", setup["other"]]) == 0
    capsys.readouterr()
    gen = ["generate", "--verifier", setup["verifier"], "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu",
           "--cpu-linears", "packed", "--drafter"]
    assert main(gen + [f"suffix:{out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("specheads: error:") == 1 and setup["verifier"] in err and setup["other"] in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(out.read_bytes()[:100])
    assert main(gen + [f"suffix:{bad}"]) == 2
    assert f"suffix index {bad} is corrupt" in capsys.readouterr().err
    assert main(["suffix-index", "--data", str(tmp_path / "none.jsonl"), "--output", str(out), "--verifier", setup["verifier"]]) == 2
    assert "none.jsonl" in capsys.readouterr().err
