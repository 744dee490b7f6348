"""Training data: self-distillation (batched = unbatched greedy, resume, append, refusal),
conversation loading, the train/eval split and the offline training prompt source.

Tiny random Llama models with a character tokenizer and a chat template (as in
tests/test_bench_cli.py), built in-process: no downloads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specheads.errors import SpecHeadsError
from specheads.training.data import (
    generate_self_distillation,
    load_conversations,
    load_self_distilled,
    prompt_id,
    split_train_eval,
)
from specheads.training.prompt_source import default_training_prompts, training_prompt_pool
from specheads.verifier import Verifier

from tiny_text import CHARS, SPECIAL, char_tokenizer
EOS = 2
MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench" / "question.jsonl"

PROMPTS = [
    "what is a hash table?",
    "write a poem about rain.",
    "count to ten.",
    "hi",
    "explain why the sky is blue, in two short sentences please.",
    "list three fruits.",
]


def tiny_verifier(seed: int, name: str | None = None) -> Verifier:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(SPECIAL) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    # A little extra weight on eos, so some answers stop early and others run to max_new_tokens.
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 1.5
    return Verifier(model=model, tokenizer=char_tokenizer(), name=name or f"tiny-{seed}")


@pytest.fixture(scope="module")
def verifier():
    return tiny_verifier(0)


def run(verifier, prompts, out, **kw):
    kw = {"max_new_tokens": 12, "batch_size": 3, "shard_size": 2, "progress": False, **kw}
    return generate_self_distillation(verifier, prompts, out, **kw)


def rows(ds):
    return [{k: ds[i][k] for k in ("prompt_id", "messages", "input_ids", "prompt_length")} for i in range(len(ds))]


@pytest.fixture(scope="module")
def reference(verifier, tmp_path_factory):
    """One uninterrupted run over PROMPTS (shard_size 2, batches of 3 within a shard -> padding)."""
    out = tmp_path_factory.mktemp("ref") / "sd"
    return rows(run(verifier, PROMPTS, out, shard_size=4)), out


# ----------------------------------------------------------------------------- self-distillation


def test_batched_greedy_equals_unbatched_generate(verifier, reference):
    records, _ = reference
    assert [r["prompt_id"] for r in records] == [prompt_id(p) for p in PROMPTS]  # input order
    stops = 0
    for prompt, rec in zip(PROMPTS, records):
        ids = verifier.encode(prompt)
        x = torch.tensor([ids])
        out = verifier.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                      eos_token_id=EOS, pad_token_id=EOS)
        expected = out[0, len(ids):].tolist()
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
            stops += 1
        assert rec["prompt_length"] == len(ids)
        assert rec["input_ids"][: rec["prompt_length"]] == ids
        assert rec["input_ids"][rec["prompt_length"]:] == expected, prompt
        assert rec["messages"] == [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": verifier.decode(expected)}]
    assert 0 < stops < len(PROMPTS)  # both cases (eos kept at the end / cut at max_new_tokens) are covered


def test_layout_manifest_and_stats(reference, verifier):
    _, out = reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and [s["count"] for s in manifest["shards"]] == [4, 2]
    assert manifest["verifier"]["fingerprint"] == verifier.fingerprint()
    assert manifest["generation"] == {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": None}
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000", "shard-00001"]
    run_stats = manifest["runs"][-1]
    assert run_stats["prompts"] == 6 and run_stats["generated_tokens"] > 0 and run_stats["tokens_per_s"] > 0
    assert len(load_self_distilled(out)) == 6


def test_prompts_whose_answers_training_would_cut_away_are_skipped_and_counted(verifier, reference, tmp_path):
    """With train_length (data.max_length), a prompt that leaves less than half of max_new_tokens
    before it is not answered: its answer would be generated only to be cut away. The others are
    answered exactly as without the limit."""
    expected, _ = reference
    lengths = [len(verifier.encode(p)) for p in PROMPTS]
    limit = sorted(lengths)[len(lengths) // 2] + 6  # 12 new tokens: a prompt may have up to limit - 6 tokens
    kept = [r for r, n in zip(expected, lengths) if n + 6 <= limit]
    assert 0 < len(kept) < len(PROMPTS)
    out = tmp_path / "sd"
    assert rows(run(verifier, PROMPTS, out, train_length=limit)) == kept
    run_stats = json.loads((out / "manifest.json").read_text())["runs"][-1]
    assert run_stats["skipped_too_long_to_train"] == len(PROMPTS) - len(kept) and run_stats["skipped_too_long"] == 0
    with pytest.raises(SpecHeadsError, match=r"answered none of the 6 prompts: .*data.max_length=3; raise data.max_length"):
        run(verifier, PROMPTS, tmp_path / "none", train_length=3)


def test_resume_after_interruption_equals_uninterrupted_run(verifier, reference, tmp_path, monkeypatch):
    expected, _ = reference
    out = tmp_path / "sd"
    real_generate = verifier.model.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # the 3rd batch (the first of shard 2) dies
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(verifier.model, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(verifier, PROMPTS, out, batch_size=1, shard_size=4)  # shard 0 = 4 batches of 1
    monkeypatch.undo()
    assert load_self_distilled(out).num_rows == 0  # nothing half-written survives
    # Interrupt again after the first complete shard.
    calls["n"] = 0
    monkeypatch.setattr(verifier.model, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(verifier, PROMPTS, out, batch_size=2, shard_size=4)  # shard 0 = 2 batches, shard 1 dies
    monkeypatch.undo()
    assert load_self_distilled(out).num_rows == 4
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    # Resume: only the missing prompts are generated.
    resumed = run(verifier, PROMPTS, out, shard_size=4)
    assert rows(resumed) == expected
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["prompts"] == 2


def test_batch_too_large_for_memory_is_named_and_leaves_no_shard(verifier, reference, tmp_path, monkeypatch):
    """A batch whose estimated size exceeds the free memory is refused before it runs, and an
    allocation failure during generation is reported the same way: the batch size named, the
    shards written before it kept, none half-written."""
    import specheads.training.data as data

    expected, _ = reference
    out = tmp_path / "sd"
    monkeypatch.setattr(data, "_free_bytes", lambda device: 1000)
    with pytest.raises(SpecHeadsError, match=r"batch of 3 prompts.*data.self_distill.batch_size \(now 3\)"):
        run(verifier, PROMPTS, out, shard_size=4)
    monkeypatch.undo()
    assert load_self_distilled(out).num_rows == 0
    real_generate, calls = verifier.model.generate, {"n": 0}

    def oom_on_third(*args, **kwargs):  # shard 0 = 2 batches of 2; shard 1's batch fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(verifier.model, "generate", oom_on_third)
    with pytest.raises(SpecHeadsError, match="batch of 2 prompts.*ran out of memory"):
        run(verifier, PROMPTS, out, batch_size=2, shard_size=4)
    monkeypatch.undo()
    assert load_self_distilled(out).num_rows == 4
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    assert rows(run(verifier, PROMPTS, out, shard_size=4)) == expected  # resumes after them


def test_resume_after_lost_shard(verifier, reference, tmp_path):
    expected, _ = reference
    out = tmp_path / "sd"
    run(verifier, PROMPTS, out, shard_size=2)
    shutil.rmtree(out / "shards" / "shard-00002")  # as if the run died before writing it
    (out / "shards" / ".tmp-shard-00002-dead").mkdir()  # and left a half-written folder
    again = run(verifier, PROMPTS, out, shard_size=2)
    assert sorted(map(json.dumps, rows(again))) == sorted(map(json.dumps, expected))
    assert len({r["prompt_id"] for r in rows(again)}) == 6
    assert not (out / "shards" / ".tmp-shard-00002-dead").exists()
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["prompts"] == 2


def test_append_new_prompts_keeps_old(verifier, reference, tmp_path):
    expected, _ = reference
    out = tmp_path / "sd"
    run(verifier, PROMPTS[:3], out)
    both = run(verifier, PROMPTS[:3] + PROMPTS[3:] + PROMPTS[:1], out)  # repeats are not redone
    assert rows(both) == expected
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi."},
            {"role": "user", "content": "how are you?"}]
    more = run(verifier, [chat], out)
    assert len(more) == 7
    last = rows(more)[-1]
    assert last["messages"][:3] == chat and last["messages"][3]["role"] == "assistant"
    assert last["input_ids"][: last["prompt_length"]] == verifier.encode(chat)


def test_other_verifier_or_settings_refused(verifier, reference, tmp_path):
    _, out = reference
    other = tiny_verifier(1, name="other-model")
    with pytest.raises(SpecHeadsError) as exc:
        run(other, PROMPTS, out)
    assert "tiny-0" in str(exc.value) and "other-model" in str(exc.value)
    with pytest.raises(SpecHeadsError, match="max_new_tokens': 12.*max_new_tokens': 13"):
        run(verifier, PROMPTS, out, max_new_tokens=13)
    with pytest.raises(SpecHeadsError, match="temperature"):
        run(verifier, PROMPTS, out, temperature=0.7)


@pytest.mark.parametrize(
    "kwargs, named",
    [({"max_new_tokens": 0}, "0"), ({"batch_size": -2}, "-2"), ({"top_p": 1.5}, "1.5"), ({"temperature": -1.0}, "-1.0")],
)
def test_bad_settings_named(verifier, tmp_path, kwargs, named):
    with pytest.raises(SpecHeadsError, match=named):
        run(verifier, PROMPTS, tmp_path / "sd", **kwargs)


def test_bad_prompts_and_dirs(verifier, tmp_path):
    with pytest.raises(SpecHeadsError, match="prompt 1"):
        run(verifier, ["fine", "   "], tmp_path / "a")
    with pytest.raises(SpecHeadsError, match="empty"):
        run(verifier, [], tmp_path / "b")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SpecHeadsError, match=str(busy)):
        run(verifier, PROMPTS, busy)


def test_sampling_is_seeded(verifier, tmp_path):
    a = rows(run(verifier, PROMPTS[:4], tmp_path / "a", temperature=0.9, top_p=0.95, seed=3))
    b = rows(run(verifier, PROMPTS[:4], tmp_path / "b", temperature=0.9, top_p=0.95, seed=3))
    assert a == b
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["generation"]["seed"] == 3


# ----------------------------------------------------------------------------- conversations


def test_load_conversations_sharegpt(verifier, tmp_path):
    path = tmp_path / "chats.jsonl"
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello."}]},
        {"id": "b", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "name a fruit"},
                                      {"from": "gpt", "value": "apple."}, {"from": "human", "value": "another?"},
                                      {"from": "gpt", "value": "pear."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "no reply here"}]},
        {"id": "d", "messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four."}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    ds = load_conversations(str(path), verifier)
    assert len(ds) == 3  # "c" has no assistant turn
    tok = verifier.tokenizer

    def text(ids):  # the char tokenizer's decode() puts spaces between tokens
        return "".join(tok.convert_ids_to_tokens(ids))

    first = ds[0]
    assert first["input_ids"][: first["prompt_length"]] == verifier.encode("hi there")
    assert text(first["input_ids"][first["prompt_length"]:]) == "hello.<|im_end|>"
    multi = ds[1]  # whole conversation kept, only the part before the first answer is prompt
    prompt = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a fruit"}],
                                     add_generation_prompt=True, tokenize=False)
    assert text(multi["input_ids"][: multi["prompt_length"]]) == prompt
    assert text(multi["input_ids"][multi["prompt_length"]:]).startswith("apple.<|im_end|>")
    assert text(multi["input_ids"]).endswith("pear.<|im_end|>")
    short = load_conversations(str(path), verifier, max_length=20)
    assert all(len(x) <= 20 for x in short["input_ids"])
    assert all(p < len(x) for p, x in zip(short["prompt_length"], short["input_ids"]))


def test_load_conversations_from_self_distilled_and_saved(verifier, reference, tmp_path):
    expected, out = reference
    ds = load_conversations(str(out), verifier)
    assert list(ds["input_ids"]) == [r["input_ids"] for r in expected]
    assert list(ds["prompt_length"]) == [r["prompt_length"] for r in expected]
    # Another verifier (same tokenizer): the messages are re-tokenised with its chat template.
    other = load_conversations(str(out), tiny_verifier(1))
    assert [x[:p] for x, p in zip(other["input_ids"], other["prompt_length"])] == [verifier.encode(p) for p in PROMPTS]
    saved = tmp_path / "saved"
    load_self_distilled(out).select_columns(["messages"]).save_to_disk(str(saved))
    assert list(load_conversations(str(saved), verifier)["prompt_length"]) == list(ds["prompt_length"])


def test_load_conversations_errors(verifier, tmp_path):
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(SpecHeadsError, match="none.jsonl.*no assistant turn"):
        load_conversations(str(empty), verifier)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(SpecHeadsError, match="wrong.jsonl.*'text'"):
        load_conversations(str(wrong), verifier)
    with pytest.raises(SpecHeadsError, match="/no/such.jsonl"):
        load_conversations("/no/such.jsonl", verifier)
    with pytest.raises(SpecHeadsError, match="max_length.*1"):
        load_conversations(str(wrong), verifier, max_length=1)


def test_split_train_eval():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[i] for i in range(40)], "prompt_length": [0] * 40})
    train, evals = split_train_eval(ds, eval_fraction=0.1, seed=1)
    assert len(evals) == 4 and len(train) == 36
    assert sorted(list(train["input_ids"]) + list(evals["input_ids"])) == [[i] for i in range(40)]
    again = split_train_eval(ds, eval_fraction=0.1, seed=1)[1]
    assert list(again["input_ids"]) == list(evals["input_ids"])
    assert list(split_train_eval(ds, eval_fraction=0.1, seed=2)[1]["input_ids"]) != list(evals["input_ids"])
    tiny_train, tiny_eval = split_train_eval(ds.select([0, 1]), eval_fraction=0.01)
    assert len(tiny_train) == 1 and len(tiny_eval) == 1
    with pytest.raises(SpecHeadsError, match="1 example"):
        split_train_eval(ds.select([0]))
    with pytest.raises(SpecHeadsError, match="1.5"):
        split_train_eval(ds, eval_fraction=1.5)


# ----------------------------------------------------------------------------- prompt source


def test_default_training_prompts():
    everything = default_training_prompts()
    assert len(everything) >= 2000
    assert len(set(everything)) == len(everything)
    assert all(isinstance(p, str) and p.strip() == p and p for p in everything)
    assert default_training_prompts(50, seed=7) == default_training_prompts(50, seed=7)
    assert default_training_prompts(50, seed=7) != default_training_prompts(50, seed=8)
    assert default_training_prompts(50, seed=7)[:10] == default_training_prompts(10, seed=7)
    assert len(default_training_prompts(1)) == 1
    assert set(default_training_prompts(seed=3)) == set(everything)
    categories = {c.split("/")[0] for c, _ in training_prompt_pool()}
    assert {"explain", "compare", "list", "code", "steps", "email", "story", "math", "stdlib"} <= categories
    with pytest.raises(SpecHeadsError, match="0"):
        default_training_prompts(0)
    with pytest.raises(SpecHeadsError, match=str(len(everything) + 1)):
        default_training_prompts(len(everything) + 1)


def test_default_training_prompts_are_not_mt_bench():
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} not present")
    firsts = {json.loads(line)["turns"][0].strip() for line in MT_BENCH.read_text().splitlines() if line.strip()}
    assert firsts
    assert not firsts & set(default_training_prompts())


def test_data_files_are_small():
    from specheads.training.prompt_source import parts_path

    assert os.path.getsize(parts_path()) < 200_000


# ----------------------------------------------------------------------------- real verifier


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_unbatched(smollm2, tmp_path):
    prompts = default_training_prompts(3, seed=1)
    ds = generate_self_distillation(smollm2, prompts, tmp_path / "sd", max_new_tokens=8, batch_size=3, progress=False)
    for prompt, rec in zip(prompts, rows(ds)):
        ids = smollm2.encode(prompt)
        x = torch.tensor([ids])
        out = smollm2.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8,
                                     eos_token_id=smollm2.eos_token_ids, pad_token_id=smollm2.eos_token_ids[0])
        expected = out[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(expected) if t in smollm2.eos_token_ids), None)
        expected = expected if stop is None else expected[: stop + 1]
        assert rec["prompt_length"] == len(ids)
        assert rec["input_ids"] == ids + expected


SPLIT_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from accelerate import Accelerator
from test_data import PROMPTS, tiny_verifier
from specheads.training.data import generate_self_distillation
acc = Accelerator(cpu=True)
ds = generate_self_distillation(tiny_verifier(0), PROMPTS + {extra!r}, {out!r}, max_new_tokens=12, batch_size=3,
                                shard_size=2, progress=False, accelerator=acc)
assert ds.num_rows == {total}, ds.num_rows  # every process reads the whole folder back
"""


@pytest.mark.slow
def test_two_processes_split_the_shards_and_write_the_same_folder_as_one(verifier, tmp_path):
    """Under accelerate, each process answers its share of the shards; the folder (records, their
    order, the manifest's list) equals a one-process run's, and a resumed two-process run adds
    only what is missing."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    extra = ["say yes.", "name a colour.", "what is 2+2?"]
    one = run(verifier, PROMPTS + extra, tmp_path / "one")
    out = tmp_path / "two"
    run(verifier, PROMPTS[:2], out)  # already stored: the two processes must skip these
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SCRIPT.format(tests=tests, out=str(out), extra=extra, total=len(PROMPTS) + len(extra)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", str(script)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_self_distilled(out)
    key = lambda r: r["prompt_id"]
    assert sorted(rows(two), key=key) == sorted(rows(one), key=key)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(PROMPTS) + len(extra)
    assert [s["name"] for s in manifest["shards"]] == sorted(p.name for p in (out / "shards").iterdir())
    assert manifest["runs"][-1]["num_processes"] == 2
    assert manifest["runs"][-1]["prompts"] == len(PROMPTS) + len(extra) - 2
    assert not [p for p in out.rglob(".tmp-*")]


def test_data_only_run_self_distils_the_recipe_and_trains_nothing(verifier, tmp_path):
    from specheads.training.loop import train
    from specheads.training.recipe import load_recipe

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    recipe = load_recipe(None, [
        f"training.output_dir={tmp_path / 'run'}", f"data.self_distill.output_dir={tmp_path / 'sd'}",
        f"data.self_distill.prompts={source}", "data.self_distill.max_new_tokens=8", "data.self_distill.batch_size=3",
        "data.eval_fraction=0.2",
    ])
    where = train(recipe, verifier=verifier, data_only=True, progress=False)
    assert where == str(tmp_path / "sd")
    assert load_self_distilled(where).num_rows == len(PROMPTS)
    assert not (tmp_path / "run" / "drafter").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_draft_vocab_command_ranks_a_draft_models_tokens(verifier, reference, tmp_path, capsys):
    """`specheads draft-vocab DIR --data SELF_DISTILLED` adds the ranking --draft-vocab reads."""
    from specheads.cli import main
    from specheads.draft_vocab import read_ranking

    ref_rows, folder = reference
    model_dir = tmp_path / "student"
    verifier.model.save_pretrained(model_dir)
    assert main(["draft-vocab", str(model_dir), "--data", str(folder)]) == 0
    answers = [t for r in ref_rows for t in r["input_ids"][r["prompt_length"]:]]
    ranked = read_ranking(model_dir)
    assert sorted(ranked) == sorted(set(answers))
    counts = [answers.count(t) for t in ranked]
    assert counts == sorted(counts, reverse=True)
    assert main(["draft-vocab", str(model_dir), "--data", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a self-distillation directory" in capsys.readouterr().err
