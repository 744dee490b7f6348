"""Reduced-precision verifiers: near-tie margins, the benchmark's tie classification, dtype auto,
the emulated-bfloat16 warning and the float32 LM head."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import EOS, REPETITIVE_PROMPTS, VOCAB, cached_verifier, make_verifier, noisy_model
from specheads.bench import MethodResult, classify_differences, make_report, markdown_table, tie_bound
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.sampling import SamplingParams
from specheads.drafters import DraftModelDrafter, NgramDrafter
from specheads.errors import SpecHeadsError
from specheads.verifier import choose_dtype, load_verifier, use_float32_head, warn_if_emulated_bf16

from test_tree import RandomTreeDrafter


# -- record_margins ---------------------------------------------------------------------------

@pytest.mark.parametrize("drafter", ["none", "chain", "tree"])
def test_record_margins_are_the_top2_gap_of_a_plain_forward(drafter):
    """Per new token, the top-1 minus top-2 logit (and the top-1 logit) of the row it was chosen
    from, as one forward over the whole sequence computes them: for plain decoding, chains and trees."""
    v = cached_verifier("llama")
    d = {"none": None, "chain": DraftModelDrafter(noisy_model("llama"), VOCAB), "tree": RandomTreeDrafter(v.model, seed=3)}[drafter]
    prompt = list(REPETITIVE_PROMPTS[0])
    out = SpeculativeDecoder(v, d, num_draft_tokens=3).generate(prompt, max_new_tokens=30, eos_token_ids=[EOS], record_margins=True)
    assert len(out.margins) == len(out.top_logits) == len(out.token_ids) > 1
    with torch.no_grad():
        logits = v.model(input_ids=torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
    top = logits.topk(2, dim=-1).values
    assert out.margins == pytest.approx((top[:, 0] - top[:, 1]).tolist(), abs=1e-4)
    assert out.top_logits == pytest.approx(top[:, 0].tolist(), abs=1e-4)
    if drafter != "none":
        assert out.stats.emitted_in_steps > out.stats.verify_steps  # some step emitted several tokens
    assert SpeculativeDecoder(v, None).generate(prompt, max_new_tokens=4).margins is None  # opt-in only


# -- tie classification -----------------------------------------------------------------------

def test_tie_bound_is_a_few_ulps_of_the_top_logit():
    # bfloat16 keeps 8 significant bits: one step at 16..32 is 2**-7 * 16 = 0.125
    assert tie_bound(torch.bfloat16, 20.0) == pytest.approx(0.5)
    assert tie_bound(torch.bfloat16, -20.0) == pytest.approx(0.5)
    assert tie_bound(torch.bfloat16, 5.0) == pytest.approx(4 * 2**-7 * 4)
    assert tie_bound(torch.float32, 20.0) == pytest.approx(4 * 2**-23 * 16)
    assert tie_bound(torch.float32, 0.0) > 0


REF = [[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]]
MARGINS = [[3.0, 0.0, 1.0, 2.0], [2.0, 2.0, 1.5, 2.0], [1.0, 1.0, 1.0, 1.0]]
TOPS = [[20.0] * 4, [20.0] * 4, [20.0] * 4]


def test_a_difference_at_a_near_tie_is_a_tie_and_at_a_wide_gap_a_mismatch():
    # output 0 first differs at position 1, where plain decoding's top-2 gap was 0: a tie;
    # output 1 at position 2, gap 1.5 (12 bfloat16 steps at 20): a mismatch; output 2 is exact
    outputs = [[5, 4, 7, 8], [1, 2, 0, 4], [9, 9, 9, 9]]
    got = classify_differences(outputs, REF, MARGINS, TOPS, torch.bfloat16)
    assert got["identity"] == "mismatch"
    assert got["identity_counts"] == {"exact": 1, "ties": 1, "mismatch": 1}
    assert [(d["prompt"], d["position"], d["gap"], d["tie"]) for d in got["differences"]] == [(0, 1, 0.0, True), (1, 2, 1.5, False)]
    assert got["differences"][0]["bound"] == pytest.approx(0.5)

    ties_only = classify_differences([[5, 4, 7, 8], REF[1], [9, 9, 9, 9]], REF, MARGINS, TOPS, torch.bfloat16)
    assert ties_only["identity"] == "ties" and ties_only["identity_counts"] == {"exact": 2, "ties": 1, "mismatch": 0}
    assert classify_differences(REF, REF, MARGINS, TOPS, torch.bfloat16) == {
        "identity": "exact", "identity_counts": {"exact": 3, "ties": 0, "mismatch": 0}, "differences": []}


def test_float32_is_strict():
    """A gap that is a tie in bfloat16 (0.1 at a top logit of 20) is a mismatch in float32."""
    margins = [[3.0, 0.1, 1.0, 2.0]] + MARGINS[1:]
    outputs = [[5, 4, 7, 8], REF[1], REF[2]]
    assert classify_differences(outputs, REF, margins, TOPS, torch.bfloat16)["identity"] == "ties"
    f32 = classify_differences(outputs, REF, margins, TOPS, torch.float32)
    assert f32["identity"] == "mismatch" and f32["differences"][0]["tie"] is False


def test_an_output_that_stops_early_is_a_mismatch():
    """Where plain decoding recorded no margin (it stopped), nothing excuses the difference."""
    got = classify_differences([[5, 6, 7, 8, 1]], [[5, 6, 7, 8]], [MARGINS[0]], [TOPS[0]], torch.bfloat16)
    assert got["identity"] == "mismatch" and got["differences"][0]["position"] == 4 and got["differences"][0]["gap"] is None


class FakeVerifier:
    name = "tiny"
    device = torch.device("cpu")
    dtype = torch.bfloat16
    dtype_choice = "auto -> bfloat16 (CPU has avx512_bf16)"
    float32_head = "LM head's top-16 logits"


def results_with(outputs_by_method: dict, margins=MARGINS, with_hf=False) -> dict:
    results = {}
    for name, outputs in outputs_by_method.items():
        r = MethodResult(name, outputs=outputs, time_s=1.0, new_tokens=sum(map(len, outputs)), drafter=None)
        if name == "plain":
            r.margins, r.top_logits = margins, TOPS
        results[name] = r
    return results


def test_report_fields_and_the_single_drafter_table():
    from specheads.bench import BenchConfig

    results = results_with({"plain": REF, "hf_generate": REF, "speculative": [[5, 4, 7, 8], REF[1], REF[2]]})
    report = make_report(FakeVerifier(), None, REF, results, BenchConfig(num_draft_tokens=(3,)))
    json.dumps(report)  # the report stays plain JSON
    spec = report["methods"]["speculative"]
    assert spec["identity"] == "ties" and spec["identity_counts"] == {"exact": 2, "ties": 1, "mismatch": 0}
    assert spec["differences"][0]["position"] == 1 and spec["identical_to_verifier"] is False
    assert report["methods"]["plain"]["identity"] == "exact"  # plain decoding is held to HF generate's outputs
    assert report["dtype"] == "bfloat16" and report["dtype_choice"].startswith("auto -> bfloat16")
    assert report["float32_head"] == "LM head's top-16 logits"
    table = markdown_table(report)
    assert "| speculative | 12.0 | 1.00x | - | - | ties (1) |" in table
    assert "| plain | 12.0 | 1.00x | - | - | exact |" in table
    assert "cpu bfloat16 (auto -> bfloat16 (CPU has avx512_bf16); LM head's top-16 logits in float32)" in table
    assert report["tie_bound"]["source"] == "ulps" and report["tie_bound"]["bound"] is None  # none given: the ulps rule
    assert ("identity: a difference is a tie where plain decoding's top-2 logit gap there is below 4 ulps of the top-1 logit "
            "in bfloat16 (no tie bound measured for this verifier)") in table

    # with a measured bound, a gap of 1.5 at a top logit of 20 (12 bfloat16 steps) is a tie
    wider = {"bound": 2.0, "safety": 2.0, "max_gap_change": 1.0, "p99_gap_change": 0.5, "positions": 100, "q": [2],
             "dtype": "bfloat16", "source": "stored"}
    results = results_with({"plain": REF, "hf_generate": REF, "speculative": [REF[0], [1, 2, 0, 4], REF[2]]})
    report = make_report(FakeVerifier(), None, REF, results, BenchConfig(num_draft_tokens=(3,)), tie=wider)
    assert report["methods"]["speculative"]["identity"] == "ties" and report["methods"]["speculative"]["differences"][0]["bound"] == 2.0
    assert report["tie_bound"]["bound"] == 2.0 and "below 2 = 2 x the largest change" in markdown_table(report)


def test_plain_decoding_differing_from_hf_generate_is_classified_by_its_own_margins():
    from specheads.bench import BenchConfig

    hf = [[5, 6, 0, 8], REF[1], REF[2]]  # differs at position 2, where plain's gap was 1.0: a mismatch
    report = make_report(FakeVerifier(), None, REF, results_with({"plain": REF, "hf_generate": hf}), BenchConfig())
    assert report["methods"]["plain"]["identity"] == "mismatch"
    assert report["methods"]["hf_generate"]["identity"] == "mismatch"


def test_side_by_side_table_and_sampling_without_identity():
    from specheads.bench import BenchConfig, BenchDrafter

    drafters = [BenchDrafter(NgramDrafter(), "ngram"), BenchDrafter(NgramDrafter(max_ngram=2), "ngram2")]
    results = results_with({"plain": REF, "speculative[ngram]": [[5, 4, 7, 8], REF[1], REF[2]],
                            "speculative[ngram2]": [[5, 6, 7, 8], [1, 2, 0, 4], REF[2]]})
    results["speculative[ngram]"].drafter, results["speculative[ngram2]"].drafter = "ngram", "ngram2"
    report = make_report(FakeVerifier(), drafters, REF, results, BenchConfig(num_draft_tokens=(3,)))
    table = markdown_table(report)
    assert "| speculative[ngram] | ngram | - | 12.0 | 1.00x | - | - | ties (1) |" in table
    assert "| speculative[ngram2] | ngram2 | - | 12.0 | 1.00x | - | - | mismatch |" in table
    assert "2 drafters side by side, cpu bfloat16 (auto -> bfloat16 (CPU has avx512_bf16); LM head's top-16 logits in float32)" in table

    sampled = make_report(FakeVerifier(), drafters, REF, results, BenchConfig(sampling=SamplingParams(temperature=0.8)))
    assert all("identity" not in m for m in sampled["methods"].values())
    assert "ties" not in markdown_table(sampled) and "exact" not in markdown_table(sampled)


# -- dtype auto and the emulated-bfloat16 warning ---------------------------------------------

def test_dtype_auto_follows_the_native_check():
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu, native=lambda d: "CPU has avx512_bf16") == (torch.bfloat16, "auto -> bfloat16 (CPU has avx512_bf16)")
    dtype, why = choose_dtype("auto", cpu, native=lambda d: None)
    assert dtype == torch.float32 and why == "auto -> float32 (CPU has none of amx_bf16, avx512_bf16)"
    assert choose_dtype("bfloat16", cpu, native=lambda d: None) == (torch.bfloat16, "bfloat16")
    with pytest.raises(SpecHeadsError, match="'bf16'"):
        choose_dtype("bf16", cpu)


def test_native_check_reads_the_cpu_flags(monkeypatch):
    import specheads.verifier as verifier

    monkeypatch.setattr(verifier, "_cpu_flags", lambda: {"fpu", "avx512f", "avx512_bf16"})
    assert verifier.native_bf16(torch.device("cpu")) == "CPU has avx512_bf16"
    monkeypatch.setattr(verifier, "_cpu_flags", lambda: {"fpu", "avx2"})
    assert verifier.native_bf16(torch.device("cpu")) is None


def test_emulated_bf16_gets_one_warning_with_the_measured_slowdown():
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning) as caught:
        ratio = warn_if_emulated_bf16(torch.bfloat16, cpu, native=lambda d: None)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert ratio > 0 and f"{ratio:.1f}x the time of a float32 one" in message and "without native bfloat16" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_emulated_bf16(torch.bfloat16, cpu, native=lambda d: "CPU has avx512_bf16") is None
        assert warn_if_emulated_bf16(torch.float32, cpu, native=lambda d: None) is None


def test_load_verifier_auto_records_its_choice(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    v = load_verifier(str(tmp_path), dtype="auto", native=lambda d: "test says so")
    assert v.dtype == torch.bfloat16 and v.dtype_choice == "auto -> bfloat16 (test says so)" and v.float32_head == "LM head's top-16 logits"
    v = load_verifier(str(tmp_path), dtype="auto", native=lambda d: None)
    assert v.dtype == torch.float32 and v.dtype_choice.startswith("auto -> float32") and v.float32_head is None
    with pytest.warns(UserWarning, match="without native bfloat16"):
        v = load_verifier(str(tmp_path), dtype="bfloat16", native=lambda d: None, float32_head=False)
    assert v.float32_head is None and type(v.model.get_output_embeddings()) is torch.nn.Linear


# -- the float32 LM head ----------------------------------------------------------------------

def bf16_llama(tied: bool):
    v = make_verifier("llama", seed=4)
    v.model.config.tie_word_embeddings = tied
    if tied:
        v.model.lm_head.weight = v.model.model.embed_tokens.weight
    v.model.to(torch.bfloat16)
    return v


@pytest.mark.parametrize("tied", [True, False])
def test_float32_head_computes_float32_logits_from_the_bf16_hidden_state(tied):
    v = bf16_llama(tied)
    ids = torch.tensor([list(REPETITIVE_PROMPTS[1])])
    with torch.no_grad():
        before = v.model(input_ids=ids, output_hidden_states=True)
    assert use_float32_head(v.model) == "LM head's top-16 logits"
    with torch.no_grad():
        after = v.model(input_ids=ids, output_hidden_states=True)
    hidden = after.hidden_states[-1]  # the final norm's output, still bf16
    assert hidden.dtype == torch.bfloat16 and torch.equal(hidden, before.hidden_states[-1])
    weight = v.model.get_input_embeddings().weight if tied else v.model.lm_head.weight
    expected = (hidden.double() @ weight.double().T)[0]
    got = after.logits[0]
    assert got.dtype == torch.float32
    # the top 16 of each row are the float32 computation's, to float32 rounding; the rest its bf16 rounding
    top = got.topk(16, dim=-1)
    assert torch.allclose(top.values.double(), expected.gather(-1, top.indices), rtol=1e-6, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got.double() - expected).abs().max() <= expected.abs().max() * 2**-8
    # the bf16 head rounds its logits to 8 significant bits: the float32 one does not
    assert not torch.equal(got.topk(2).values, before.logits[0].float().topk(2).values)
    embeddings = v.model.get_input_embeddings().weight
    assert embeddings.dtype == torch.bfloat16 and v.model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert (v.model.get_output_embeddings().weight is embeddings) == tied
    assert v.dtype == torch.bfloat16
    assert set(v.model.state_dict()) == set(make_verifier("llama", seed=4).model.state_dict())  # checkpoints unchanged


def test_float32_head_computes_a_row_of_many_near_ties_wholly_in_float32():
    """30 tokens with the same weights tie at the top: more than the 16 refined, so that row is
    computed in float32 throughout (a token outside the 16 could otherwise win)."""
    from specheads.streamed_linear import Float32Head

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 200, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight[100:130] = linear.weight[7]
        linear.bias[100:130] = linear.bias[7]
    x = torch.stack([linear.weight[7].float() * 5, torch.randn(32)]).to(torch.bfloat16)
    got = Float32Head.wrap(linear)(x)
    expected = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert torch.allclose(got[0], expected[0], rtol=1e-6, atol=1e-5)  # wholly float32
    assert not torch.allclose(got[1], expected[1], rtol=1e-6, atol=1e-5)  # a plain row: only its top 16
    top = got[1].topk(16)
    assert torch.allclose(top.values, expected[1][top.indices], rtol=1e-6, atol=1e-5)


def test_float32_head_streams_and_decodes_losslessly():
    """Streamed for the row counts tuning gives it, and greedy speculative decoding with it equals plain decoding."""
    from specheads.streamed_linear import stream_linears

    v = bf16_llama(False)
    use_float32_head(v.model)
    prompt = list(REPETITIVE_PROMPTS[0])
    plain = SpeculativeDecoder(v, None).generate(prompt, max_new_tokens=24, eos_token_ids=[EOS])
    stream_linears(v.model, head_rows=range(2, 17))
    head = v.model.get_output_embeddings()
    assert head.rows == frozenset(range(2, 17))
    x = torch.randn(1, 4, 32, dtype=torch.bfloat16)
    streamed = head(x)
    head.rows = frozenset()
    assert torch.allclose(streamed, head(x), atol=1e-5) and streamed.dtype == torch.float32
    spec = SpeculativeDecoder(v, NgramDrafter(), num_draft_tokens=3).generate(prompt, max_new_tokens=24, eos_token_ids=[EOS])
    assert spec.token_ids == plain.token_ids


# -- the command line -------------------------------------------------------------------------

from test_bench_cli import bench_args, tiny_dirs  # noqa: E402,F401  (the fixture, shared)


def test_bench_in_bfloat16_reports_dtype_head_and_identity(tiny_dirs, tmp_path, capsys, monkeypatch):
    from specheads.cli import main

    # a store of its own: another test of this session may have stored this verifier's bound already
    monkeypatch.setenv("SPECHEADS_CACHE", str(tmp_path / "cache"))

    assert main(bench_args(tiny_dirs, tmp_path, "ngram", "--dtype", "bfloat16", "--no-hf", "--cpu-linears", "packed")) == 0
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["dtype_choice"] == "bfloat16"
    assert report["float32_head"] == "LM head's top-16 logits"
    spec = report["methods"]["speculative"]
    assert spec["identity"] in ("exact", "ties") and sum(spec["identity_counts"].values()) == 3
    assert report["methods"]["plain"]["identity"] == "exact"
    assert "cpu bfloat16 (LM head's top-16 logits in float32)" in (tmp_path / "report.md").read_text()
    assert "bfloat16, LM head's top-16 logits in float32" in err
    # the tie bound: measured once for this verifier and dtype (quickly), stored, used and printed
    tie = report["tie_bound"]
    assert tie["source"] == "measured" and tie["dtype"] == "bfloat16" and tie["bound"] > 0
    assert tie["bound"] == pytest.approx(2 * tie["max_gap_change"])
    assert "measuring how far q-token verify forwards move the logits" in err
    assert all(d["bound"] >= tie["bound"] for d in spec["differences"])
    rule = f"identity: a difference is a tie where plain decoding's top-2 logit gap there is below {tie['bound']:.3g} = 2 x"
    assert rule in (tmp_path / "report.md").read_text() and rule in out

    assert main(bench_args(tiny_dirs, tmp_path / "off", "ngram", "--dtype", "bfloat16", "--float32-head", "off", "--no-hf",
                           "--cpu-linears", "packed")) == 0
    assert json.loads((tmp_path / "off" / "report.json").read_text())["float32_head"] is None
    capsys.readouterr()
    # a second run of the same verifier and dtype reuses the stored bound
    assert main(bench_args(tiny_dirs, tmp_path / "again", "ngram", "--dtype", "bfloat16", "--no-hf", "--cpu-linears", "packed")) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())["tie_bound"]
    assert again["source"] == "stored" and again["bound"] == tie["bound"]
    assert "measuring how far" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, dtype, why", [({"avx512_bf16"}, "bfloat16", "CPU has avx512_bf16"),
                                               ({"avx2"}, "float32", "CPU has none of amx_bf16, avx512_bf16")])
def test_generate_dtype_auto_says_what_it_chose_and_why(tiny_dirs, capsys, monkeypatch, flags, dtype, why):
    import specheads.verifier as verifier
    from specheads.cli import main

    monkeypatch.setattr(verifier, "_cpu_flags", lambda: flags)
    assert main(["generate", "--verifier", tiny_dirs["verifier"], "--drafter", "none", "--prompt", "hello",
                 "--max-new-tokens", "4", "--device", "cpu", "--dtype", "auto"]) == 0
    assert f": {dtype} (auto -> {dtype} ({why}))" in capsys.readouterr().err
