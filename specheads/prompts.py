"""Prompt sources for generation, benchmarks and self-distillation.

A prompt is a plain string or chat turns ``[{"role": ..., "content": ...}]``; ``Verifier.encode``
turns either into token ids: through the tokenizer's chat template when it has one, else (a base
model) chat turns become plain text, "User: ...\nAssistant:" (``turns_as_plain_text``). Sources: ``default`` (a small set shipped with the package, so
everything runs offline), ``translation`` (shipped: English paragraphs to translate), ``random``
(lists of random letter strings to continue), a jsonl file (MT-Bench / Spec-Bench records with ``turns``, or records
with ``prompt`` / ``instruction`` / ``question`` / ``messages``), a directory written by
``datasets.save_to_disk``, ShareGPT V3's first user turns (``sharegpt`` for the installed copy or
``sharegpt:PATH``; see ``specheads.training.sharegpt``), or a Hugging Face dataset name (``name``
or ``name:split``; without a split, ``train``, else ``train_sft`` as UltraChat names its chat split).
With ``turns`` > 1, conversation records (``messages`` / ``conversations`` / MT-Bench ``turns``)
become scripts ``{"user_turns": [...]}`` of their first user turns, for self-distillation to answer
one after the other (``record_to_script``).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

from .errors import SpecHeadsError

Prompt = Any  # str | list[dict]
TEXT_FIELDS = ("prompt", "instruction", "question", "input", "text")


def default_prompts_path() -> str:
    return str(resources.files("specheads") / "data" / "prompts.jsonl")


# Shipped prompt sets beside "default": where drafts have a hard time (text in another language
# than the prompt; words no model can predict), for checking that speculation does not cost speed.
SHIPPED = {"translation": "translation.jsonl"}


def random_word_prompts(n: int = 20, words: int = 30, seed: int = 0) -> list[str]:
    """``n`` prompts asking to continue a list of random letter strings: text no drafter has seen."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["Continue this list with ten more words like these: " + " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(words)) for _ in range(n)]


def record_to_prompt(record: dict, field: str | None = None) -> Prompt:
    """One dataset record -> a prompt (its first user turn for multi-turn records)."""
    if field is not None:
        if field not in record:
            raise SpecHeadsError(f"prompt field '{field}' not in record with keys {sorted(record)}")
        value = record[field]
    elif "turns" in record:  # MT-Bench / Spec-Bench
        value = record["turns"]
    elif "messages" in record or "conversations" in record:
        value = record.get("messages") or record.get("conversations")
    else:
        present = [k for k in TEXT_FIELDS if k in record]
        if not present:
            raise SpecHeadsError(f"record has none of the prompt fields {TEXT_FIELDS + ('turns', 'messages')}: keys {sorted(record)}")
        value = record[present[0]]
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [{"role": "user", "content": value[0]}]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        turns = [_normalise_turn(t) for t in value]
        # Prompt = everything before the first assistant turn.
        first_reply = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), len(turns))
        return turns[:first_reply] or turns[:1]
    if isinstance(value, str):
        return value
    raise SpecHeadsError(f"cannot read a prompt from value {value!r}")


def record_to_script(record: dict, turns: int) -> Prompt | None:
    """One conversation record -> ``{"user_turns": [...]}``: its first ``turns`` user turns (stopping
    at a blank one or one over ``sharegpt.SCRIPT_TURN_CHARS`` characters; system turns are left out), or None
    when its first user turn is unusable. A record with a single prompt text stays that text."""
    from .training.sharegpt import SCRIPT_TURN_CHARS  # the limit ShareGPT scripts stop at

    if "turns" in record and isinstance(record["turns"], list):  # MT-Bench / Spec-Bench
        users = [t for t in record["turns"] if isinstance(t, str)]
    elif isinstance(record.get("messages") or record.get("conversations"), list):
        users = [str(t["content"]) for t in map(_normalise_turn, record.get("messages") or record.get("conversations"))
                 if t["role"] in ("user", "human")]
    else:
        return record_to_prompt(record)
    script = []
    for text in users:
        text = text.strip()
        if not text or len(text) > SCRIPT_TURN_CHARS or len(script) == turns:
            break
        script.append(text)
    return {"user_turns": script} if script else None


def pick_split(names, source: str) -> str:
    """The split a source without ``:split`` means: ``train``, else ``train_sft`` (UltraChat), else the only one."""
    names = list(names)
    for name in ("train", "train_sft"):
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise SpecHeadsError(f"'{source}' has splits {sorted(names)} and none is 'train' or 'train_sft': name one as '{source}:SPLIT'")


def _normalise_turn(turn: dict) -> dict:
    role = turn.get("role") or {"human": "user", "gpt": "assistant"}.get(turn.get("from", ""), turn.get("from", "user"))
    return {"role": role, "content": turn.get("content", turn.get("value", ""))}


def load_prompts(source: str = "default", *, field: str | None = None, limit: int | None = None, turns: int = 1) -> list[Prompt]:
    """The prompts of ``source`` (see the module docstring), in its own order; at most ``limit``.
    ``turns`` > 1: conversation records become ``{"user_turns": [...]}`` scripts (``record_to_script``)."""
    if limit is not None and limit < 1:
        raise SpecHeadsError(f"number of prompts must be >= 1, got {limit}")
    if source == "default":
        source = default_prompts_path()
    elif source in SHIPPED:
        source = str(resources.files("specheads") / "data" / SHIPPED[source])
    elif source == "random":
        return random_word_prompts()[:limit]
    from .training.sharegpt import first_user_turns, is_sharegpt_source, source_path

    if is_sharegpt_source(source):  # before the hub: "sharegpt:PATH" is not "name:split"
        return first_user_turns(source_path(source), limit=limit)
    if source.endswith((".jsonl", ".json")):
        if not os.path.isfile(source):
            raise SpecHeadsError(f"prompt file not found: {source}")
        records = []
        with open(source) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise SpecHeadsError(f"{source}:{lineno} is not valid JSON: {exc}") from exc
    elif os.path.isdir(source) or (":" in source and os.path.isdir(source.rpartition(":")[0])):
        from datasets import DatasetDict, load_from_disk

        folder, split = (source, "") if os.path.isdir(source) else source.rpartition(":")[::2]
        records = load_from_disk(folder)
        if isinstance(records, DatasetDict):
            split = split or pick_split(records, source)
            if split not in records:
                raise SpecHeadsError(f"saved dataset {folder} has no split '{split}' (it has {sorted(records)})")
            records = records[split]
    else:
        from datasets import get_dataset_split_names, load_dataset

        name, _, split = source.partition(":")
        try:
            records = load_dataset(name, split=split or pick_split(get_dataset_split_names(name), source))
        except SpecHeadsError:
            raise
        except Exception as exc:  # datasets raises many types for "not found / offline"
            raise SpecHeadsError(f"cannot load prompts from '{source}': not a file, a saved dataset or a reachable hub dataset ({exc})") from exc
    prompts = []
    for record in records:
        prompt = record_to_prompt(dict(record), field) if turns == 1 or field else record_to_script(dict(record), turns)
        if prompt is not None:
            prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise SpecHeadsError(f"no prompts in '{source}'")
    return prompts


PLAIN_TEXT_NO_TEMPLATE = "plain text (verifier has no chat template)"


def turns_as_plain_text(turns) -> str:
    """Chat turns as plain text, for a verifier without a chat template (a base model): one
    "Role: content" line per turn, then "Assistant:" for the model to continue, e.g.
    "User: What is a hash table?\nAssistant:"."""
    lines = [f"{str(t.get('role') or 'user').capitalize()}: {str(t.get('content', '')).strip()}" for t in turns]
    return "\n".join(lines + ["Assistant:"])


def prompt_format(verifier, prompts: list[Prompt], chat_template: bool | None = None) -> str:
    """How ``verifier.encode(p, chat_template)`` encodes these prompts, in words for a run's header
    and report: "chat template", "plain text", or PLAIN_TEXT_NO_TEMPLATE when chat turns meet a
    verifier without a chat template (several, joined by "; ", for a mixed list)."""
    has_template = bool(getattr(getattr(verifier, "tokenizer", None), "chat_template", None))
    use = has_template if chat_template is None else chat_template
    formats = []
    for p in prompts:
        if use:
            f = "chat template"
        elif isinstance(p, str) or has_template or chat_template is False:
            f = "plain text"
        else:
            f = PLAIN_TEXT_NO_TEMPLATE
        if f not in formats:
            formats.append(f)
    return "; ".join(formats)
