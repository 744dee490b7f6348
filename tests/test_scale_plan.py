"""`specheads plan`: parameter counts, memory terms and throughput of the scale plan.

The counts are exact (the model built on the meta device), so the shipped hub configs must give the
parameter counts their model cards state; the memory terms must scale as the code keeps tensors
(the attention scores of training-time test as L^2, the rest as L); errors name the bad value.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.cli import main
from specheads.scale_plan import Hardware, count_parameters, eagle3_parameters, load_config, plan

# Public parameter counts (the model cards' safetensors totals).
PUBLISHED = {
    "meta-llama/Llama-3.1-8B-Instruct": (8_030_261_248, 8_030_261_248),
    "Qwen/Qwen3-8B": (8_190_735_360, 8_190_735_360),
    "Qwen/Qwen3-30B-A3B": (30_532_122_624, 3_353_032_704),  # 3.3B active: 8 of 128 experts per token
    "meta-llama/Llama-3.3-70B-Instruct": (70_553_706_496, 70_553_706_496),
}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_shipped_configs_give_the_published_parameter_counts(hub_id):
    counts = count_parameters(load_config(hub_id))
    assert (counts.total, counts.active) == PUBLISHED[hub_id]


def small_config(**kw):
    base = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def test_counts_equal_the_instantiated_model():
    for tied in (False, True):
        cfg = small_config(tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg)
        assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())


def test_eagle3_count_is_the_real_drafter():
    from specheads.drafters.eagle3 import Eagle3Config, Eagle3Model

    cfg = small_config()

    class Shim:
        config, hidden_size, vocab_size = cfg, cfg.hidden_size, cfg.vocab_size

    e = Eagle3Config.from_verifier(Shim(), 200, None, 1)
    real = Eagle3Model(e, d2t=torch.zeros(200, dtype=torch.long))
    expected = sum(p.numel() for n, p in real.named_parameters() if p.requires_grad and not n.startswith("rotary."))
    assert eagle3_parameters(cfg, 200) == expected
    # fc (3H x H) + the layer's 2H-wide attention input + MLP + norms + the draft head
    H, I, hd = 64, 160, 16
    layer = 2 * H * (4 * hd) + 2 * 2 * H * (2 * hd) + (4 * hd) * H + 3 * H * I + 3 * H
    assert expected == 3 * H * H + layer + H + 200 * H


def test_memory_terms_scale_as_the_code_keeps_them():
    p = plan(small_config(), verifier="tiny", draft_vocab_size=200, ttt_steps=4, lengths=(512, 1024), hardware=Hardware(gpus=4))
    a, b = p.memory[512], p.memory[1024]
    assert b["activations_drafter_scores"] == pytest.approx(4 * a["activations_drafter_scores"])
    assert b["activations_verifier"] == pytest.approx(2 * a["activations_verifier"])
    assert a["drafter_state_sharded"] == pytest.approx(a["drafter_state_replicated"] / 4)
    assert a["verifier_sharded"] < a["verifier_whole"]
    # 3 aux features + the last hidden state in bf16, and the argmax
    assert p.feature_bytes_per_token == 4 * 64 * 2 + 8
    assert p.tokens_per_gpu_hour[512]["offline"] > p.tokens_per_gpu_hour[512]["online"]


def test_plan_cli_prints_and_refuses_bad_values(capsys):
    assert main(["plan", "--verifier", "Qwen/Qwen3-8B", "--lengths", "2048"]) == 0
    out = capsys.readouterr().out
    assert "8.19B parameters" in out and "32,776 bytes per token" in out
    assert main(["plan", "--verifier", "Qwen/Qwen3-8B", "--mfu", "1.5"]) == 2
    assert "--mfu 1.5 must be in (0, 1]" in capsys.readouterr().err
    assert main(["plan", "--verifier", "nobody/no-such-model"]) == 2
    assert "no config for verifier 'nobody/no-such-model'" in capsys.readouterr().err
