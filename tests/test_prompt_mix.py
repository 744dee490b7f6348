"""Self-distillation prompts from several sources (``data.self_distill.prompts: [a, b]``), mixed
in equal shares and a seeded order; UltraChat-shaped datasets (``messages`` with role/content,
several user turns, a ``train_sft`` split) give first user turns, or with ``turns`` > 1 scripts
answered turn by turn. Checked on local files of the hub datasets' shape (no hub here)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from specheads.errors import SpecHeadsError
from specheads.prompts import load_prompts
from specheads.training.data import prompt_id
from specheads.training.prompt_source import training_prompts
from specheads.training.recipe import load_recipe


def ultrachat_record(i: int, user_turns: int = 3) -> dict:
    messages = []
    for t in range(user_turns):
        messages += [{"role": "user", "content": f"question {i}.{t}"}, {"role": "assistant", "content": f"answer {i}.{t}"}]
    return {"prompt": f"question {i}.0", "prompt_id": str(i), "messages": messages}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    plain = root / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"plain prompt {i}"}) + "\n" for i in range(10)))
    chat = root / "ultrachat"
    DatasetDict({
        "train_sft": Dataset.from_list([ultrachat_record(i, 1 + i % 3) for i in range(10)]),
        "test_sft": Dataset.from_list([ultrachat_record(100 + i) for i in range(3)]),
    }).save_to_disk(str(chat))
    return str(plain), str(chat)


def test_two_sources_mix_in_equal_shares_and_a_seeded_order(sources):
    plain, chat = sources
    mixed = training_prompts([plain, chat], 8, seed=0)
    assert len(mixed) == 8
    from_plain = [p for p in mixed if isinstance(p, str)]
    assert set(from_plain) == {f"plain prompt {i}" for i in range(4)}  # each source's first 4, in its own order
    assert len(mixed) - len(from_plain) == 4
    # UltraChat records with turns=1: the first user turn (train_sft picked: no 'train' split)
    assert sorted(p[0]["content"] for p in mixed if not isinstance(p, str)) == [f"question {i}.0" for i in range(4)]
    again, other = training_prompts([plain, chat], 8, seed=0), training_prompts([plain, chat], 8, seed=1)
    assert again == mixed and sorted(map(prompt_id, other)) == sorted(map(prompt_id, mixed)) and other != mixed
    assert [isinstance(p, str) for p in mixed] != [True] * 4 + [False] * 4  # interleaved, not one block after the other


def test_turns_make_scripts_of_conversation_records(sources):
    plain, chat = sources
    mixed = training_prompts([chat, plain], 7, seed=0, turns=2)
    scripts = [p for p in mixed if isinstance(p, dict)]
    assert len(scripts) == 4 and len(mixed) == 7  # 7 = 4 + 3
    by_first = {s["user_turns"][0]: s["user_turns"] for s in scripts}
    assert by_first == {"question 0.0": ["question 0.0"], "question 1.0": ["question 1.0", "question 1.1"],
                        "question 2.0": ["question 2.0", "question 2.1"], "question 3.0": ["question 3.0"]}
    assert load_prompts(f"{chat}:test_sft", turns=3)[0] == {"user_turns": ["question 100.0", "question 100.1", "question 100.2"]}


def test_a_short_source_leaves_its_share_to_the_others_and_repeats_are_dropped(sources, tmp_path):
    plain, chat = sources
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("plain prompt 0", "only here")))
    mixed = training_prompts([str(short), plain], 6, seed=0)
    assert len(mixed) == 6 and len({prompt_id(p) for p in mixed}) == 6
    assert "only here" in mixed and "plain prompt 0" in mixed
    assert set(mixed) - {"only here"} == {f"plain prompt {i}" for i in range(5)}  # plain prompt 0 once


def test_saved_dataset_splits(sources, tmp_path):
    _, chat = sources
    with pytest.raises(SpecHeadsError, match=r"no split 'validation' \(it has \['test_sft', 'train_sft'\]\)"):
        load_prompts(f"{chat}:validation")
    DatasetDict({"a": Dataset.from_list([{"prompt": "x"}]), "b": Dataset.from_list([{"prompt": "y"}])}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(SpecHeadsError, match=r"has splits \['a', 'b'\] and none is 'train' or 'train_sft'"):
        load_prompts(str(tmp_path / "ab"))


def test_a_recipe_takes_a_list_of_prompt_sources(sources):
    plain, chat = sources
    recipe = load_recipe(None, [f"data.self_distill.prompts=[{plain}, {chat}]", "data.self_distill.turns=2"])
    assert recipe.data.self_distill.prompts == [plain, chat]
    with pytest.raises(SpecHeadsError, match="names a source twice"):
        load_recipe(None, [f"data.self_distill.prompts=[{plain}, {plain}]"])
    with pytest.raises(SpecHeadsError, match="ShareGPT file /nowhere.json does not exist"):
        load_recipe(None, [f"data.self_distill.prompts=[{plain}, 'sharegpt:/nowhere.json']"])
