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
