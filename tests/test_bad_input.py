"""Bad input raises SpecHeadsError (a ValueError) whose message names the offending value."""

from __future__ import annotations

import pytest

from conftest import MAX_POSITIONS, VOCAB, cached_verifier, make_model
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.sampling import SamplingParams
from specheads.drafters import DraftModelDrafter, NgramDrafter, build_drafter
from specheads.errors import SpecHeadsError
from specheads.verifier import load_verifier

PROMPT = [5, 9, 13, 5, 9]


@pytest.fixture
def llama():
    return cached_verifier("llama", 0)


def test_spec_heads_error_is_a_value_error():
    assert issubclass(SpecHeadsError, ValueError)


def test_draft_model_vocab_mismatch():
    draft = make_model("llama", seed=3, vocab=96)
    with pytest.raises(SpecHeadsError) as exc:
        DraftModelDrafter(draft, verifier_vocab_size=VOCAB)
    msg = str(exc.value)
    assert "96" in msg and str(VOCAB) in msg


@pytest.mark.parametrize("bad", [0, -3])
def test_max_new_tokens_below_one(llama, bad):
    with pytest.raises(SpecHeadsError) as exc:
        SpeculativeDecoder(llama, NgramDrafter(), control="fixed").generate(PROMPT, max_new_tokens=bad)
    assert "max_new_tokens" in str(exc.value) and str(bad) in str(exc.value)


def test_empty_prompt(llama):
    with pytest.raises(SpecHeadsError) as exc:
        SpeculativeDecoder(llama, NgramDrafter(), control="fixed").generate([], max_new_tokens=4)
    assert "empty prompt" in str(exc.value)


def test_prompt_token_outside_vocab(llama):
    with pytest.raises(SpecHeadsError) as exc:
        SpeculativeDecoder(llama).generate(PROMPT + [VOCAB + 7], max_new_tokens=4)
    assert str(VOCAB + 7) in str(exc.value) and str(VOCAB) in str(exc.value)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_prompt_plus_max_new_tokens_beyond_context(arch_name):
    verifier = cached_verifier(arch_name, 0)
    assert verifier.max_context == MAX_POSITIONS
    too_many = MAX_POSITIONS - len(PROMPT) + 1
    with pytest.raises(SpecHeadsError) as exc:
        SpeculativeDecoder(verifier, NgramDrafter(), control="fixed").generate(PROMPT, max_new_tokens=too_many)
    msg = str(exc.value)
    assert str(too_many) in msg and str(MAX_POSITIONS) in msg and str(len(PROMPT)) in msg


def test_prompt_alone_beyond_context():
    verifier = cached_verifier("qwen2", 0)
    prompt = [7] * (MAX_POSITIONS + 5)
    with pytest.raises(SpecHeadsError) as exc:
        SpeculativeDecoder(verifier).generate(prompt, max_new_tokens=1)
    assert str(MAX_POSITIONS + 5) in str(exc.value)


def test_build_drafter_unknown_name(llama):
    with pytest.raises(SpecHeadsError) as exc:
        build_drafter("nonsense", llama)
    assert "nonsense" in str(exc.value)


def test_build_drafter_missing_path(llama):
    with pytest.raises(SpecHeadsError) as exc:
        build_drafter("/nonexistent/path", llama)
    assert "/nonexistent/path" in str(exc.value)


def test_build_drafter_directory_without_config(llama, tmp_path):
    with pytest.raises(SpecHeadsError) as exc:
        build_drafter(str(tmp_path), llama)
    assert str(tmp_path) in str(exc.value)


def test_build_drafter_invalid_config_json(llama, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecHeadsError) as exc:
        build_drafter(str(tmp_path), llama)
    assert str(tmp_path / "config.json") in str(exc.value)


def test_build_drafter_unknown_checkpoint_kind(llama, tmp_path):
    (tmp_path / "config.json").write_text('{"specheads": {"drafter_kind": "warp-drive"}}')
    with pytest.raises(SpecHeadsError) as exc:
        build_drafter(str(tmp_path), llama)
    assert "warp-drive" in str(exc.value)


def test_build_drafter_known_names(llama):
    assert build_drafter(None, llama) is None
    assert build_drafter("none", llama) is None
    assert isinstance(build_drafter("ngram", llama), NgramDrafter)


def test_load_verifier_missing_dir():
    with pytest.raises(SpecHeadsError) as exc:
        load_verifier("/nonexistent/dir")
    assert "/nonexistent/dir" in str(exc.value)


def test_load_verifier_missing_gguf():
    with pytest.raises(SpecHeadsError) as exc:
        load_verifier("/nonexistent/model.gguf")
    assert "/nonexistent/model.gguf" in str(exc.value)


def test_load_verifier_dir_without_config(tmp_path):
    with pytest.raises(SpecHeadsError) as exc:
        load_verifier(str(tmp_path))
    assert str(tmp_path) in str(exc.value)


def test_load_verifier_bad_dtype():
    with pytest.raises(SpecHeadsError) as exc:
        load_verifier("/nonexistent/dir", dtype="float7")
    assert "float7" in str(exc.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1), "temperature must be >= 0 (0 = greedy), got -1.0"),
        # The whole message: "(0, 1]" alone is in it whatever value it names.
        (dict(top_p=0), "top_p must be in (0, 1] (1 = off), got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1] (1 = off), got 1.5"),
        (dict(top_k=-2), "top_k must be >= 0 (0 = off), got -2"),
    ],
)
def test_sampling_params(kwargs, message):
    with pytest.raises(SpecHeadsError) as exc:
        SamplingParams(**kwargs)
    assert str(exc.value) == message


def test_num_draft_tokens_negative(llama):
    with pytest.raises(SpecHeadsError) as exc:
        SpeculativeDecoder(llama, NgramDrafter(), num_draft_tokens=-1, control="fixed")
    assert "num_draft_tokens" in str(exc.value) and "-1" in str(exc.value)
    with pytest.raises(SpecHeadsError) as exc:
        SpeculativeDecoder(llama, NgramDrafter(), control="adaptive")
    assert "'adaptive'" in str(exc.value) and "goodput" in str(exc.value)


def test_ngram_sizes():
    with pytest.raises(SpecHeadsError) as exc:
        NgramDrafter(max_ngram=2, min_ngram=3)
    assert "3" in str(exc.value) and "2" in str(exc.value)
    with pytest.raises(SpecHeadsError):
        NgramDrafter(max_ngram=2, min_ngram=0)


def test_stop_strings_without_tokenizer(llama):
    with pytest.raises(SpecHeadsError, match="tokenizer"):
        SpeculativeDecoder(llama).generate(PROMPT, max_new_tokens=3, stop_strings=["\n"])
