"""Draft models cut from the verifier's own layers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.errors import SpecHeadsError
from specheads.student import cut_layers, parse_layers


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_all_layers_kept_gives_the_verifier():
    model = tiny()
    student = cut_layers(model, [0, 1, 2, 3])
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    torch.testing.assert_close(student(ids).logits, model(ids).logits)


def test_subset_keeps_shapes_and_embeddings():
    model = tiny()
    student = cut_layers(model, parse_layers("every:2", 4))
    assert student.config.num_hidden_layers == 2
    assert student.get_output_embeddings().weight.shape == model.get_output_embeddings().weight.shape
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("spec, named", [("0,9", "9"), ("every:0", "every:0"), ("a,b", "a,b")])
def test_bad_layer_specs(spec, named):
    with pytest.raises(SpecHeadsError) as exc:
        parse_layers(spec, 4)
    assert named in str(exc.value)


def test_layer_spec_syntax_is_checked_before_the_verifier_is_known():
    from specheads.student import layer_spec_ok

    assert all(layer_spec_ok(s) for s in ("every:6", "first:3", "0,3,7", "0, 3", [0, 2]))
    assert not any(layer_spec_ok(s) for s in ("every:0", "first:0", "a,b", "", [], [-1], 3, None))
    assert parse_layers([0, 3], 4) == [0, 3]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fresh_student_from_config_keeps_vocabulary_and_family(arch):
    from conftest import VOCAB, make_model
    from specheads.student import student_from_config

    verifier = make_model(arch)
    same = student_from_config(verifier, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    assert type(same) is type(verifier)
    assert same.config.num_hidden_layers == 1 and same.config.num_attention_heads == 2
    assert same.get_output_embeddings().weight.shape == (VOCAB, 32)
    torch.testing.assert_close(same.get_input_embeddings().weight, verifier.get_input_embeddings().weight)
    torch.testing.assert_close(same.get_output_embeddings().weight, verifier.get_output_embeddings().weight)
    narrow = student_from_config(verifier, hidden_size=16, num_layers=2, num_heads=2, seed=1)
    assert narrow.get_output_embeddings().weight.shape == (VOCAB, 16)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert narrow(ids).logits.shape == (1, 5, VOCAB)
    again = student_from_config(verifier, hidden_size=16, num_layers=2, num_heads=2, seed=1)
    torch.testing.assert_close(again(ids).logits, narrow(ids).logits)  # seeded init
