"""Streamed linear layers (specheads.streamed_linear): the same product as nn.Linear, the same
parameters, the same module names, and lossless decoding with every linear streamed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import REPETITIVE_PROMPTS, FakeMachine, hf_greedy, make_model, noisy_copy, EOS, VOCAB
from specheads.decoding import SpeculativeDecoder
from specheads.drafters import DraftModelDrafter, NgramDrafter
from specheads.streamed_linear import StreamedLinear, _fill, stream_linears, tune_streaming
from specheads.verifier import Verifier


@pytest.mark.parametrize("bias", [False, True])
def test_streamed_linear_computes_the_linear_product_for_chosen_row_counts_only(bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    streamed = StreamedLinear.wrap(base, rows=[3])
    assert streamed.weight is base.weight and streamed.bias is base.bias
    for shape in [(3, 24), (1, 3, 24), (2, 24), (1, 24), (4, 5, 24)]:
        x = torch.randn(shape)
        torch.testing.assert_close(streamed(x), base(x), rtol=1e-5, atol=1e-6)
        assert streamed(x).shape == base(x).shape
    # Gradients reach the shared weight through the streamed form too.
    x = torch.randn(3, 24, requires_grad=True)
    streamed(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    w_grad = base.weight.grad.clone()
    base.weight.grad = None
    base(ref).square().sum().backward()
    torch.testing.assert_close(w_grad, base.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_fill_counts_rows_between_two_chosen_neighbours():
    assert _fill([2, 3, 4, 8], [2, 3, 4, 6, 8]) == [2, 3, 4, 8]  # 6 measured and lost: the gap stays
    assert _fill([2, 4, 8], [2, 4, 8, 16]) == [2, 3, 4, 5, 6, 7, 8]
    assert _fill([], [2, 4]) == []


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_streaming_every_linear_keeps_logits_ties_names_and_greedy_output(arch):
    model = make_model(arch)
    names = list(model.state_dict())
    prompt = list(REPETITIVE_PROMPTS[0])
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        before = model(ids).logits
    ref = hf_greedy(model, prompt, 30, EOS)
    drafter_model = noisy_copy(model)
    stream_linears(model, head_rows=range(2, 17), layer_rows=range(2, 17))
    assert list(model.state_dict()) == names  # checkpoints and peft see the same module tree
    head = model.get_output_embeddings()
    assert isinstance(head, StreamedLinear) and head.rows == frozenset(range(2, 17))
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight
    with torch.inference_mode():
        torch.testing.assert_close(model(ids[:, :8]).logits, before[:, :8], rtol=1e-4, atol=1e-5)
    v = Verifier(model=model, tokenizer=None, name=f"tiny-{arch}")
    for drafter in (NgramDrafter(), DraftModelDrafter(drafter_model, VOCAB)):
        out = SpeculativeDecoder(v, drafter, num_draft_tokens=4, control="fixed").generate(prompt, max_new_tokens=30, eos_token_ids=[EOS])
        assert out.token_ids == ref


def test_tune_streaming_measures_each_form_and_applies_its_choice():
    model = make_model("llama", vocab=VOCAB)
    report = tune_streaming(model, rows=(2, 4), context=16, min_rounds=2, max_rounds=2)
    assert report["device"] == "cpu" and set(report["forward_ms"]) == {"packed", "head", "all"}
    assert all(set(v) == {2, 4} and all(t > 0 for t in v.values()) for v in report["forward_ms"].values())
    assert set(report["layer_rows"]) <= set(report["head_rows"]) <= {2, 3, 4}
    assert model.get_output_embeddings().rows == frozenset(report["head_rows"])
    layers = [m for n, m in model.named_modules() if isinstance(m, StreamedLinear) and m is not model.get_output_embeddings()]
    assert layers and all(m.rows == frozenset(report["layer_rows"]) for m in layers)


def flat_cost(q: int) -> float:
    return 40.0 + q


def test_a_tuning_choice_is_stored_per_key_and_reused(tmp_path, capsys):
    from specheads.streamed_linear import machine_key, tune_or_reuse

    store = tmp_path / "cpu_linears.json"
    machine = FakeMachine(flat_cost, noise=0.02)
    model = make_model("llama")
    machine.attach(model)
    key = machine_key(model)
    assert "threads=" in key and "float32" in key and key == machine_key(make_model("llama"))
    assert key != machine_key(make_model("llama", seed=1))  # another model, another measurement
    first = tune_or_reuse(model, key, store, **machine.timing())
    assert first["reused"] is False and store.is_file() and first["measurement"]["stable"] is True
    other = make_model("llama")
    again = tune_or_reuse(other, key, store)
    assert again["reused"] is True and again["head_rows"] == first["head_rows"]
    assert other.get_output_embeddings().rows == frozenset(first["head_rows"])
    machine.attach(other)
    assert tune_or_reuse(other, key, store, retune=True, **machine.timing())["reused"] is False
    assert "CPU-linears" not in capsys.readouterr().err  # quiet and settled: nothing to say


@pytest.mark.parametrize("corrupt, said", [
    ("{not json", "is unreadable"),
    ({"head_rows": [2, 3], "layer_rows": [2], "forward_ms": {}}, "an older specheads stored it"),
    ({"head_rows": "all", "layer_rows": [], "forward_ms": {}, "measurement": {}}, "head_rows is 'all'"),
    ({"head_rows": [2], "layer_rows": [2, 3], "forward_ms": {}, "measurement": {}}, "layer_rows [2, 3] stream where"),
    ({"head_rows": [], "layer_rows": [], "forward_ms": {"packed": {"2": 1.0}}, "measurement": {}}, "forward_ms is not"),
    ({"head_rows": [], "layer_rows": [], "measurement": {},
      "forward_ms": {"packed": {"2": 1.0}, "head": {"2": 0.0}, "all": {"2": 1.0}}}, "forward_ms head q=2 is 0.0"),
], ids=["json", "old-format", "rows-type", "rows-subset", "forms", "timing"])
def test_a_corrupt_tuning_choice_is_measured_again_with_a_message(tmp_path, capsys, corrupt, said):
    from specheads.streamed_linear import machine_key, tune_or_reuse

    store = tmp_path / "cpu_linears.json"
    model = make_model("llama")
    key = machine_key(model)
    store.write_text(corrupt if isinstance(corrupt, str) else json.dumps({key: corrupt}))
    machine = FakeMachine(flat_cost, noise=0.02)
    machine.attach(model)
    report = tune_or_reuse(model, key, store, **machine.timing())
    err = capsys.readouterr().err
    assert report["reused"] is False and said in err and "measuring" in err, err
    assert tune_or_reuse(model, key, store)["reused"] is True  # the new measurement was stored


@pytest.mark.parametrize("machine, said", [
    (FakeMachine(flat_cost, noise=0.02, load=40.0), "load average was 40.00"),
    (FakeMachine(flat_cost, noise=0.02, cpu_share=0.4), "got 40% of the CPU time"),
    (FakeMachine(flat_cost, noise=0.02, drift=1.01), "the medians still moved"),
], ids=["load", "cpu-share", "unsettled"])
def test_a_busy_or_unsettled_tuning_is_not_stored(tmp_path, capsys, machine, said):
    from specheads.streamed_linear import machine_key, tune_or_reuse

    store = tmp_path / "cpu_linears.json"
    model = make_model("llama")
    machine.attach(model)
    report = tune_or_reuse(model, machine_key(model), store, max_rounds=8, **machine.timing())
    err = capsys.readouterr().err
    assert report["reused"] is False and not store.exists()
    assert "not storing the CPU-linears choice" in err and said in err and "spread up to" in err
    report = tune_or_reuse(model, machine_key(model), store, max_rounds=8, force=True, **machine.timing())
    assert store.exists() and "WARNING: storing the CPU-linears choice" in capsys.readouterr().err
