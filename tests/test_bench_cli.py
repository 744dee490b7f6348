"""The benchmark and the command line, end to end on tiny models saved to disk."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.cli import main

from tiny_text import CHARS, SPECIAL, char_tokenizer


def save_tiny(path, seed, vocab_size=len(SPECIAL) + len(CHARS)):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    prompts = root / "questions.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"question_id": i, "turns": [t, "and again?"]})
                  for i, t in enumerate(["what is a hash table?", "write a poem about rain.", "count to ten."]))
    )
    return {
        "verifier": save_tiny(root / "verifier", 0),
        "draft": save_tiny(root / "draft", 1),
        "wrong_vocab": save_tiny(root / "wrong_vocab", 2, vocab_size=80),
        "prompts": str(prompts),
    }


def bench_args(d, out, drafter, *extra):
    return ["bench", "--verifier", d["verifier"], "--drafter", drafter, "--prompts", d["prompts"],
            "--max-new-tokens", "24", "--device", "cpu", "--output", str(out), *extra]


def test_bench_report_with_draft_model(tiny_dirs, tmp_path):
    # fixed control: every step drafts 4 tokens, so the report has 4 positions to show
    assert main(bench_args(tiny_dirs, tmp_path, tiny_dirs["draft"], "--control", "fixed")) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_prompts"] == 3
    methods = report["methods"]
    assert set(methods) == {"plain", "hf_generate", "hf_assisted", "speculative"}
    for name, m in methods.items():
        for key in ("tokens_per_s", "tau", "acceptance_per_position", "speedup", "identical_to_verifier"):
            assert key in m, (name, key)
        assert m["identical_to_verifier"] is True, name  # float32, greedy: lossless
        assert m["tokens_per_s"] > 0
    assert methods["plain"]["speedup"] == pytest.approx(1.0)
    spec = methods["speculative"]
    assert len(spec["acceptance_per_position"]) == 4
    assert 1.0 <= spec["tau"] <= 5.0
    assert "ceiling_speedup" in spec
    assert (tmp_path / "report.md").read_text().count("| speculative |") == 1
    assert "drafter `draft_model` (full vocabulary)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_bench_sweep_and_sampling(tiny_dirs, tmp_path):
    args = bench_args(tiny_dirs, tmp_path, "ngram", "--num-draft-tokens", "1,3", "--temperature", "0.8", "--no-hf")
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["methods"]) == {"plain", "speculative[k=1]", "speculative[k=3]"}
    assert all(m["identical_to_verifier"] is None for m in report["methods"].values())  # sampled: no identity claim


def test_generate_prints_text(tiny_dirs, capsys):
    code = main(["generate", "--verifier", tiny_dirs["verifier"], "--drafter", tiny_dirs["draft"],
                 "--prompt", "hello there", "--max-new-tokens", "8", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert "tau" in captured.err and "8 tokens" in captured.err


@pytest.mark.parametrize(
    "args, named",
    [
        (["--drafter", "nonsense"], "nonsense"),
        (["--drafter", "WRONG"], "80"),
        (["--max-new-tokens", "0"], "0"),
        (["--num-draft-tokens", "x,2"], "x,2"),
        (["--prompts", "/nonexistent/q.jsonl"], "/nonexistent/q.jsonl"),
        (["--drafter", "ngram,,"], "ngram,,"),
        (["--drafter", "ngram,none"], "ngram,none"),
        (["--drafter", "ngram,ngram"], "ngram,ngram"),
        (["--drafter", "ngram,/no/such/drafter"], "/no/such/drafter"),
    ],
)
def test_bad_cli_input_is_one_clear_error(tiny_dirs, tmp_path, capsys, args, named):
    base = bench_args(tiny_dirs, tmp_path, "ngram")
    args = [tiny_dirs["wrong_vocab"] if a == "WRONG" else a for a in args]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("specheads: error:")]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in err


def test_unknown_verifier(tmp_path, capsys):
    assert main(["bench", "--verifier", "./no/such/model", "--output", str(tmp_path)]) == 2
    assert "./no/such/model" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "bench", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--max-new-tokens" in capsys.readouterr().out


def test_bench_sweeps_medusa_trees(tiny_dirs, tmp_path):
    from specheads.drafters.medusa import MedusaConfig, MedusaHeads, save_medusa
    from specheads.verifier import load_verifier

    verifier = load_verifier(tiny_dirs["verifier"], device="cpu")
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=verifier.vocab_size, num_heads=3))
    heads.init_lm_heads_from(verifier.model.lm_head.weight)
    save_medusa(tmp_path / "medusa", heads, verifier)
    args = bench_args(tiny_dirs, tmp_path / "out", str(tmp_path / "medusa"), "--tree", "chain,tree8,auto", "--num-draft-tokens", "3", "--no-hf")
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # untrained heads record no accuracy, so auto is the 16-node preset, which goodput control cuts per step
    assert set(report["methods"]) == {"plain", "speculative[tree=chain]", "speculative[tree=tree8]", "speculative[tree=auto:tree16]"}
    assert report["drafter"] == "medusa"
    for m in report["methods"].values():
        assert m["identical_to_verifier"] is True
    # Medusa heads fix their vocabulary at training: --draft-vocab is refused, not ignored
    assert main(bench_args(tiny_dirs, tmp_path / "bad", str(tmp_path / "medusa"), "--draft-vocab", "8", "--no-hf")) == 2


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_stop_string_ends_generation_at_the_completing_token(tiny_dirs, drafter):
    from specheads.decoding.engine import SpeculativeDecoder
    from specheads.drafters import build_drafter
    from specheads.verifier import load_verifier

    v = load_verifier(tiny_dirs["verifier"], device="cpu")
    decoder = SpeculativeDecoder(v, build_drafter(drafter, v), num_draft_tokens=3, control="fixed")
    ids = v.encode("what is a hash table?")
    full = decoder.generate(ids, max_new_tokens=30, eos_token_ids=[]).token_ids
    stop = v.tokenizer.decode(full[12:14])
    expected = next(j for j in range(1, len(full) + 1) if stop in v.tokenizer.decode(full[:j]))
    out = decoder.generate(ids, max_new_tokens=30, eos_token_ids=[], stop_strings=[stop])
    assert out.token_ids == full[:expected]
    assert out.finish_reason == "stop_string"


def test_bench_sweeps_draft_vocabularies(tiny_dirs, tmp_path):
    """--draft-vocab 0,12 runs the draft model over its full vocabulary and its 12 most frequent
    tokens side by side, both lossless."""
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(tiny_dirs["draft"], draft)
    ranked = list(range(3, 40))  # a ranking file as specheads writes it: most frequent first
    (draft / "draft_vocab.json").write_text(json.dumps({"source": "test", "token_ids": ranked, "counts": [1] * len(ranked)}))
    args = bench_args(tiny_dirs, tmp_path / "out", str(draft), "--draft-vocab", "0,12", "--num-draft-tokens", "3", "--no-hf")
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["methods"]) == {"plain", "speculative[vocab=all]", "speculative[vocab=12]"}
    for m in report["methods"].values():
        assert m["identical_to_verifier"] is True
    assert main(bench_args(tiny_dirs, tmp_path / "bad", str(draft), "--draft-vocab", "-1", "--no-hf")) == 2
    assert main(bench_args(tiny_dirs, tmp_path / "bad", str(draft), "--draft-vocab", "999", "--no-hf")) == 2


def save_tiny_medusa(tiny_dirs, path):
    from specheads.drafters.medusa import MedusaConfig, MedusaHeads, save_medusa
    from specheads.verifier import load_verifier

    verifier = load_verifier(tiny_dirs["verifier"], device="cpu")
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=verifier.vocab_size, num_heads=3))
    heads.init_lm_heads_from(verifier.model.lm_head.weight)
    save_medusa(path, heads, verifier)
    return str(path)


def test_bench_puts_several_drafters_side_by_side(tiny_dirs, tmp_path, capsys):
    """--drafter ngram,MEDUSA,DRAFT: one run, each drafter loaded once and swept over the options its
    kind takes (Medusa trees, draft vocabularies), every method named after its drafter and lossless."""
    import shutil

    medusa = save_tiny_medusa(tiny_dirs, tmp_path / "runs" / "medusa" / "drafter")
    draft = tmp_path / "runs" / "distill" / "drafter"
    shutil.copytree(tiny_dirs["draft"], draft)
    ranked = list(range(3, 40))
    (draft / "draft_vocab.json").write_text(json.dumps({"source": "test", "token_ids": ranked, "counts": [1] * len(ranked)}))
    out = tmp_path / "out"
    args = bench_args(tiny_dirs, out, f"ngram,{medusa},{draft}", "--tree", "chain,tree8", "--draft-vocab", "0,12",
                      "--num-draft-tokens", "3", "--control", "fixed")
    assert main(args) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert set(methods) == {
        "plain", "hf_generate", "hf_prompt_lookup[ngram]", "hf_assisted[draft_model:distill/drafter]",
        "speculative[ngram]",
        "speculative[medusa:medusa/drafter,tree=chain]", "speculative[medusa:medusa/drafter,tree=tree8]",
        "speculative[draft_model:distill/drafter,vocab=all]", "speculative[draft_model:distill/drafter,vocab=12]",
    }
    plain = methods["plain"]["tokens_per_s"]
    for name, m in methods.items():
        assert m["identical_to_verifier"] is True, name  # float32, greedy: lossless
        assert m["speedup"] == pytest.approx(m["tokens_per_s"] / plain), name  # every ratio against this run's plain
    assert methods["speculative[ngram]"]["drafter"] == "ngram"
    tree8 = methods["speculative[medusa:medusa/drafter,tree=tree8]"]["detail"]
    assert tree8.startswith("tree tree8, ")  # the preset's paths the 3 heads can reach
    assert methods["speculative[draft_model:distill/drafter,vocab=12]"]["detail"] == "draft vocabulary of 12 tokens"
    assert len(methods["speculative[medusa:medusa/drafter,tree=chain]"]["acceptance_per_position"]) == 3
    assert report["drafter"] == "ngram, medusa:medusa/drafter, draft_model:distill/drafter"
    assert report["drafter_detail"] is None
    drafters = {d["label"]: d for d in report["drafters"]}
    assert [d["kind"] for d in report["drafters"]] == ["ngram", "medusa", "draft_model"]
    assert drafters["ngram"]["not_swept"] == ["--tree", "--draft-vocab"]
    assert drafters["medusa:medusa/drafter"]["not_swept"] == ["--draft-vocab"]
    assert set(drafters["medusa:medusa/drafter"]["variants"]) == {"tree=chain", "tree=tree8"}
    assert drafters["medusa:medusa/drafter"]["draft_vocab"] == "all"
    assert drafters["draft_model:distill/drafter"]["not_swept"] == ["--tree"]
    assert drafters["draft_model:distill/drafter"]["spec"] == str(draft)
    # options a kind does not take are said on stderr, not refused
    assert "--draft-vocab not swept for `medusa:medusa/drafter`" in err
    assert "--tree not swept for `draft_model:distill/drafter`" in err
    assert err.count("CPU linears:") <= 2  # tuned (or reused) once per run, not per drafter
    table = (out / "report.md").read_text()
    assert "3 drafters side by side" in table
    assert "| method | drafter | variant |" in table
    assert f"| speculative[medusa:medusa/drafter,tree=tree8] | medusa:medusa/drafter | {tree8} |" in table
    assert drafters["draft_model:distill/drafter"]["draft_vocab"] == ["all", 12]
    assert drafters["medusa:medusa/drafter"]["tree"] == ["chain", "tree8"]
    assert f"- `draft_model:distill/drafter` ({draft}): draft_model; draft vocabulary all, 12; variants vocab=all (full vocabulary), " in table
    assert "not swept: --tree" in table
    assert (out / "report.png").stat().st_size > 1000


def test_bench_two_drafters_with_a_draft_length_sweep(tiny_dirs, tmp_path):
    medusa = save_tiny_medusa(tiny_dirs, tmp_path / "medusa")
    args = bench_args(tiny_dirs, tmp_path / "out", f"{medusa},ngram", "--num-draft-tokens", "1,3", "--no-hf")
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["methods"]) == {"plain", "speculative[medusa:medusa,k=1]", "speculative[medusa:medusa,k=3]",
                                      "speculative[ngram,k=1]", "speculative[ngram,k=3]"}
    assert all(m["identical_to_verifier"] is True for m in report["methods"].values())
    assert set(report["best_draft_length"]) == {"medusa:medusa", "ngram"}
    table = (tmp_path / "out" / "report.md").read_text()
    assert "best draft length cap (ngram) by measured speedup" in table  # goodput control: k is a cap
    assert "(goodput control chose each step's draft length up to the cap)" in table


def test_drafter_labels_tell_apart_runs_with_the_same_folder_names():
    from specheads.cli import _drafter_labels

    specs = ["/r/a/medusa/drafter", "/r/b/medusa/drafter", "/r/distill/drafter", "ngram", "/m/SmolLM2-360M"]
    kinds = ["medusa", "medusa", "draft_model", "ngram", "draft_model"]
    assert _drafter_labels(specs, kinds) == [
        "medusa:a/medusa/drafter", "medusa:b/medusa/drafter", "draft_model:distill/drafter", "ngram", "draft_model:SmolLM2-360M"]


def test_shipped_prompt_sets_where_drafts_struggle():
    from specheads.prompts import load_prompts

    translation = load_prompts("translation")
    assert len(translation) == 20 and all(p.startswith("Translate the following text into ") for p in translation)
    rand = load_prompts("random", limit=5)
    assert len(rand) == 5 and rand == load_prompts("random")[:5] and len(set(rand)) == 5  # fixed seed, all different


def test_demo_benches_the_trained_drafter_the_lookups_and_their_hybrid_side_by_side(tiny_dirs, tmp_path):
    """The demo's three roles in one bench run, and its closing lines read from that run's report:
    each role's tau and speedup, the hybrid's per-part shares, and the hybrid over the lookups."""
    import shutil

    from specheads.cli import demo_methods, demo_summary

    draft = tmp_path / "runs" / "quick" / "drafter"
    shutil.copytree(tiny_dirs["draft"], draft)
    roles = demo_methods(str(draft), "ngram+suffix", None)
    assert roles == {"trained": str(draft), "lookups": "ngram+suffix", "hybrid": f"{draft}+ngram+suffix"}
    assert demo_methods(str(draft), "ngram+suffix", "idx.safetensors")["hybrid"] == f"{draft}+ngram+suffix:idx.safetensors"
    assert demo_methods(str(draft), "none", None) == {"trained": str(draft)}
    out = tmp_path / "out"
    assert main(bench_args(tiny_dirs, out, ",".join(roles.values()), "--no-hf")) == 0
    report = json.loads((out / "report.json").read_text())
    text = demo_summary(report, roles, "draft model", str(draft), str(out))
    methods = [m for n, m in report["methods"].items() if n.startswith("speculative")]
    assert len(methods) == 3 and all(m["identical_to_verifier"] for m in methods)
    lines = text.splitlines()
    for role, m in zip(("draft model alone", "lookups without it", "hybrid of the draft model and the lookups"), methods):
        (line,) = [ln for ln in lines if ln.strip().startswith(role)]
        assert f"tau {m['tau']:.2f}, speedup {m['speedup']:.2f}x" in line
    hybrid, lookups = methods[2], methods[1]
    shares = ", ".join(f"{p['name']} {p['accepted_share']:.0%}" for p in hybrid["parts"])
    assert f"share of the hybrid's accepted draft tokens each part proposed: {shares}" in text
    assert f"the trained drafter adds {hybrid['speedup'] / lookups['speedup']:.2f}x to the lookups" in text


def test_the_demo_index_is_built_once_and_again_when_its_data_changed(tmp_path, monkeypatch):
    """The demo's suffix index of the verifier's answers follows the self-distilled folder it was
    built from: reused while the folder is unchanged, rebuilt after new answers were stored."""
    import os
    import types

    from specheads import cli

    data, out = tmp_path / "sd", tmp_path / "run"
    recipe = types.SimpleNamespace(data=types.SimpleNamespace(self_distill=types.SimpleNamespace(output_dir=str(data))),
                                   training=types.SimpleNamespace(output_dir=str(out)))
    assert cli._demo_suffix_index(recipe, "v", False) is None  # no answers yet: nothing to index
    data.mkdir()
    out.mkdir()
    (data / "manifest.json").write_text("{}")
    os.utime(data / "manifest.json", (1000, 1000))
    builds = []

    def build(source, verifier, path):
        builds.append(source)
        open(path, "w").close()
        return types.SimpleNamespace(meta={"num_conversations": 3}, num_tokens=30)

    monkeypatch.setattr("specheads.drafters.suffix_index.build_corpus_index", build)
    monkeypatch.setattr("specheads.verifier.load_verifier", lambda *a, **k: None)
    path = cli._demo_suffix_index(recipe, "v", False)
    assert path == str(out / "suffix_answers.safetensors") and builds == [str(data)]
    os.utime(path, (2000, 2000))
    assert cli._demo_suffix_index(recipe, "v", False) == path and len(builds) == 1  # unchanged data: reused
    os.utime(data / "manifest.json", (3000, 3000))  # new answers stored after the index was built
    assert cli._demo_suffix_index(recipe, "v", False) == path and len(builds) == 2
