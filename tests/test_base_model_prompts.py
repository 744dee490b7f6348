"""A verifier without a chat template (a base model) benchmarked on chat prompts (MT-Bench turns):
the turns are encoded as plain text, "User: ...\\nAssistant:", the run says so on stderr and in
the report, and only a forced chat template (``--chat-template on``) is an error."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.cli import main
from specheads.errors import SpecHeadsError
from specheads.prompts import PLAIN_TEXT_NO_TEMPLATE, load_prompts, prompt_format, turns_as_plain_text
from specheads.verifier import Verifier

from tiny_text import VOCAB_SIZE, char_tokenizer


def base_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = None  # a base model's tokenizer
    return tok


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


TURNS = [{"role": "user", "content": "what is a hash table?"}]


def test_turns_as_plain_text():
    assert turns_as_plain_text(TURNS) == "User: what is a hash table?\nAssistant:"
    turns = [{"role": "system", "content": "be brief."}, {"role": "user", "content": " count to ten. "}]
    assert turns_as_plain_text(turns) == "System: be brief.\nUser: count to ten.\nAssistant:"


def test_encode_without_a_chat_template():
    tok = base_tokenizer()
    v = Verifier(model=tiny_model(), tokenizer=tok, name="tiny-base")
    plain = tok("User: what is a hash table?\nAssistant:", add_special_tokens=True)["input_ids"]
    assert v.encode(TURNS) == plain
    assert v.encode(TURNS, chat_template=False) == plain
    assert v.encode("count to ten.") == tok("count to ten.", add_special_tokens=True)["input_ids"]
    # Only a forced chat template is an error.
    for prompt in (TURNS, "count to ten."):
        with pytest.raises(SpecHeadsError, match="no chat template"):
            v.encode(prompt, chat_template=True)
    assert prompt_format(v, [TURNS]) == PLAIN_TEXT_NO_TEMPLATE
    assert prompt_format(v, ["count to ten."]) == "plain text"
    assert prompt_format(v, [TURNS], chat_template=False) == "plain text"
    assert prompt_format(v, [TURNS], chat_template=True) == "chat template"


def test_encode_with_a_chat_template_is_unchanged():
    tok = char_tokenizer()
    v = Verifier(model=tiny_model(), tokenizer=tok, name="tiny-chat")
    templated = tok("<|im_start|>what is a hash table?<|im_end|><|im_start|>", add_special_tokens=True)["input_ids"]
    assert v.encode(TURNS) == v.encode(TURNS, chat_template=True) == templated
    assert v.encode("what is a hash table?") == templated  # a string is wrapped as a user turn
    # --chat-template off: turns as the same plain text as for a base model
    assert v.encode(TURNS, chat_template=False) == tok("User: what is a hash table?\nAssistant:")["input_ids"]
    assert prompt_format(v, [TURNS]) == "chat template"


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    tiny_model(0).save_pretrained(root / "verifier")
    base_tokenizer().save_pretrained(root / "verifier")
    prompts = root / "mt_bench.jsonl"
    prompts.write_text("\n".join(
        json.dumps({"question_id": i, "turns": [t, "and again?"]})
        for i, t in enumerate(["what is a hash table?", "write a poem about rain."])
    ))
    return {"verifier": str(root / "verifier"), "prompts": str(prompts)}


def bench(d, out, *extra):
    return ["bench", "--verifier", d["verifier"], "--drafter", "ngram", "--prompts", d["prompts"],
            "--max-new-tokens", "8", "--device", "cpu", "--no-hf", "--output", str(out), *extra]


def test_bench_a_base_model_on_chat_prompts(base_dirs, tmp_path, capsys):
    assert load_prompts(base_dirs["prompts"])[0] == TURNS  # MT-Bench records are chat turns
    assert main(bench(base_dirs, tmp_path)) == 0
    err = capsys.readouterr().err
    header = [line for line in err.splitlines() if "has no chat template" in line]
    assert len(header) == 1 and "plain text" in header[0] and "User: ...\\nAssistant:" in header[0], err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prompt_format"] == PLAIN_TEXT_NO_TEMPLATE == "plain text (verifier has no chat template)"
    assert report["num_prompts"] == 2
    # the prompts' tokens are those of the plain text
    tok = base_tokenizer()
    lengths = [len(tok(turns_as_plain_text([{"role": "user", "content": t}]))["input_ids"])
               for t in ("what is a hash table?", "write a poem about rain.")]
    assert report["mean_prompt_tokens"] == pytest.approx(sum(lengths) / 2)


def test_bench_forcing_the_chat_template_is_one_clear_error(base_dirs, tmp_path, capsys):
    assert main(bench(base_dirs, tmp_path, "--chat-template", "on")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("specheads: error:")]
    assert len(errors) == 1 and "no chat template" in errors[0], err
    assert "Traceback" not in err
