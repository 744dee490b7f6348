"""The suffix drafter's token indexes against brute-force counting, and the index file."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest

from conftest import cached_verifier
from specheads.drafters.suffix_index import (
    SEP,
    SuffixArray,
    TokenBuffer,
    build_corpus_index,
    check_index_verifier,
    index_verifier_info,
    suffix_array,
)
from specheads.errors import SpecHeadsError


def corpus(seed: int, n_seqs: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Few symbols and copied spans: long repeats, big ranges (> 1024 occurrences) and SEP endings.
    seqs = []
    for _ in range(n_seqs):
        seq = [rng.randrange(vocab) for _ in range(rng.randrange(1, length))]
        if seqs and rng.random() < 0.5:
            src = rng.choice(seqs)
            a = rng.randrange(len(src))
            seq[rng.randrange(len(seq)):] = src[a : a + rng.randrange(1, 30)]
        seqs.append(seq)
    return seqs


def flat(seqs) -> list[int]:
    return [t for s in seqs for t in s + [SEP]]


def occurrences(text: list[int], pattern: list[int]) -> list[int]:
    """Positions right after each occurrence of ``pattern`` in ``text``."""
    m = len(pattern)
    return [i + m for i in range(len(text) - m + 1) if text[i : i + m] == pattern]


def brute_children(text, pattern):
    """(known, {token: count}) of what follows ``pattern`` in ``text`` (SEP and the end: nothing)."""
    counts: dict[int, int] = {}
    for j in occurrences(text, pattern):
        if j < len(text) and text[j] != SEP:
            counts[text[j]] = counts.get(text[j], 0) + 1
    return sum(counts.values()), counts


def brute_longest(text, context, max_len, exclude_end=False):
    best = 0
    for n in range(1, min(max_len, len(context)) + 1):
        if brute_children(text, context[-n:])[0] == 0:
            break
        best = n
    return best


def ranks(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64) + 1


@pytest.mark.parametrize("depth", [1, 3, 8, 40])
def test_suffix_array_sorts_by_the_first_tokens_ties_by_position(depth):
    text = flat(corpus(0, 40, 30, 3))
    sa = suffix_array(np.asarray(text, dtype=np.int32), depth).tolist()
    key = [[t + 1 for t in text[i : i + depth]] for i in range(len(text))]  # SEP (-1) first
    assert sa == sorted(range(len(text)), key=lambda i: (key[i], i))


@pytest.mark.parametrize("vocab", [3, 7])
def test_index_and_buffer_count_like_brute_force(vocab):
    seqs = corpus(vocab, 400 if vocab == 3 else 120, 60, vocab)
    text = flat(seqs)
    index = SuffixArray.build(seqs, sort_depth=24)
    buffer = TokenBuffer()
    for s in seqs:
        buffer.extend(s)
        buffer.end_sequence()
    assert index.num_tokens == sum(map(len, seqs))
    rng = random.Random(1)
    big = 0
    for _ in range(60):
        src = rng.choice(seqs)
        a = rng.randrange(len(src))
        context = [rng.randrange(vocab) for _ in range(rng.randrange(0, 4))] + src[: a + 1]
        longest = brute_longest(text, context, 16)
        for part in (index, buffer):
            length, state = part.longest_suffix(ranks(context), 16)
            assert length == longest, (part, context)
            if not length:
                continue
            path = context[-length:]
            for _ in range(3):  # walk down the most frequent child, comparing every level
                known, want = brute_children(text, path)
                big += known > 1024
                got_known, children = part.expand(state, 0.0)
                assert got_known == known and {t: c for t, c, _ in children} == want
                assert [c for _, c, _ in children] == sorted(want.values(), reverse=True)
                # A fraction keeps exactly the children with at least that share of `known`.
                _, kept = part.expand(state, 0.3)
                assert {t for t, _, _ in kept} == {t for t, c in want.items() if c >= max(1, np.ceil(0.3 * known - 1e-9))}
                for t in list(want)[:2] + [vocab + 5]:
                    count, _ = part.child(state, t)
                    assert count == want.get(t, 0)
                if not children:
                    break
                token, _, state = children[0]
                path = path + [token]
    assert vocab == 7 or big > 0, "no range took the sampled search path"


def test_longest_suffix_bound_and_sequence_ends():
    index = SuffixArray.build([[1, 2, 3], [1, 2, 4, 5]], sort_depth=16)
    # [1, 2, 4] occurs, followed by 5; 3 only ends a sequence, so nothing after it can be drafted.
    assert index.longest_suffix(ranks([9, 1, 2, 4]), 8)[0] == 3
    assert index.longest_suffix(ranks([9, 1, 2, 3]), 8) == (0, None)
    assert index.longest_suffix(ranks([9, 1, 2, 4]), 2)[0] == 2  # the caller's bound
    assert index.longest_suffix(ranks([7]), 8) == (0, None)
    known, children = index.expand(index.longest_suffix(ranks([1, 2]), 8)[1], 0.0)
    assert known == 2 and sorted((t, c) for t, c, _ in children) == [(3, 1), (4, 1)]
    # The request's own suffix, at the buffer's end, is not a match of itself.
    buf = TokenBuffer()
    buf.extend([5, 6, 7, 5, 6])
    length, state = buf.longest_suffix(buf.ranks(), 8)
    assert length == 2 and buf.expand(state, 0.0)[1][0][:2] == (7, 1)


def test_long_repeats_tie_up_to_the_sort_depth():
    seqs = [[i % 50 for i in range(2000)]] * 20  # one period repeated: suffixes tie far past the sort depth
    index = SuffixArray.build(seqs, sort_depth=64)
    length, state = index.longest_suffix(ranks(list(range(20, 50)) + list(range(10))), 24)
    assert length == 24
    known, children = index.expand(state, 0.1)
    assert [(t, c) for t, c, _ in children] == [(10, known)] and known == 20 * 39
    assert index.expand((0, index.sa.size, 64), 0.0) == (0, [])  # past the sort depth: no order to read


# ----------------------------------------------------------------------------- the file


def test_save_load_round_trip_and_metadata(tmp_path):
    v = cached_verifier("llama")
    seqs = corpus(2, 30, 20, 60)
    index = SuffixArray.build(seqs, sort_depth=32)
    path = index.save(tmp_path / "c.safetensors", {"verifier": index_verifier_info(v), "source": "test"})
    loaded = SuffixArray.load(path, v)
    assert np.array_equal(loaded.tokens, index.tokens) and np.array_equal(loaded.sa, index.sa)
    assert loaded.sort_depth == 32 and loaded.path == str(path)
    assert loaded.meta["num_tokens"] == sum(map(len, seqs)) and loaded.meta["num_sequences"] == len(seqs)
    assert loaded.meta["verifier"]["name"] == v.name and "tokenizer" in loaded.meta["verifier"]
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file was left behind"


def test_index_for_another_verifier_is_refused_naming_both(tmp_path):
    mine, other = cached_verifier("llama"), cached_verifier("llama", 1)
    path = SuffixArray.build([[1, 2, 3]], sort_depth=8).save(tmp_path / "c.safetensors", {"verifier": index_verifier_info(mine)})
    with pytest.raises(SpecHeadsError) as err:
        SuffixArray.load(path, other)
    msg = str(err.value)
    assert mine.name in msg and other.name in msg and "lm_head_sha256" in msg and str(path) in msg
    # Same model, another tokenizer (chat template): refused too, naming what differs.
    recorded = index_verifier_info(mine)
    recorded["tokenizer"] = {"vocab_size": 64, "chat_template_sha1": "0" * 40}
    with pytest.raises(SpecHeadsError, match="tokenizer"):
        check_index_verifier(recorded, mine, path)
    with pytest.raises(SpecHeadsError, match="does not record the verifier"):
        check_index_verifier(None, mine, path)


def corrupt_cases(tmp_path):
    v = cached_verifier("llama")
    good = SuffixArray.build([[1, 2, 3], [4, 5]], sort_depth=8).save(tmp_path / "good.safetensors", {"verifier": index_verifier_info(v)})
    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    cases = {"truncated": data[: len(data) - 7], "garbage": b"\x00\x01not safetensors at all", "empty": b""}

    def rewrite(name, tensors=None, meta=None):
        from safetensors.numpy import save_file

        arrays = {"tokens": np.array([1, 2, 3, SEP, 4, 5, SEP], dtype=np.int32)}
        arrays["suffix_array"] = suffix_array(arrays["tokens"], 8)
        arrays.update(tensors or {})
        m = json.loads(header["__metadata__"]["specheads"])
        m.update(meta or {})
        save_file({k: v for k, v in arrays.items() if v is not None}, str(tmp_path / name), metadata={"specheads": json.dumps(m)})
        return (tmp_path / name).read_bytes()

    cases["unsorted"] = rewrite("u", {"suffix_array": np.arange(7, dtype=np.int32)})
    cases["not a permutation"] = rewrite("p", {"suffix_array": np.zeros(7, dtype=np.int32)})
    cases["no suffix array"] = rewrite("n", {"suffix_array": None})
    cases["token outside the vocabulary"] = rewrite("t", {"tokens": np.array([1, 2, 300, SEP, 4, 5, SEP], dtype=np.int32)})
    cases["other format"] = rewrite("f", meta={"format": "something.else"})
    return cases


def test_corrupt_or_missing_index_files_get_a_clear_error(tmp_path):
    v = cached_verifier("llama")
    for name, data in corrupt_cases(tmp_path).items():
        path = tmp_path / f"bad-{name.replace(' ', '-')}.safetensors"
        path.write_bytes(data)
        with pytest.raises(SpecHeadsError) as err:
            SuffixArray.load(path, v)
        assert str(path) in str(err.value), (name, str(err.value))
    with pytest.raises(SpecHeadsError, match="not found.*specheads suffix-index"):
        SuffixArray.load(tmp_path / "missing.safetensors", v)
    with pytest.raises(SpecHeadsError, match="is a directory"):
        SuffixArray.build([[1]], sort_depth=4).save(tmp_path, {})


def test_build_corpus_index_keeps_answers_and_a_prompt_tail(tmp_path):
    from tiny_text import char_tokenizer
    from specheads.training.data import tokenize_conversation
    from specheads.verifier import Verifier

    v = cached_verifier("llama")
    text_verifier = Verifier(model=v.model, tokenizer=char_tokenizer(), name="tiny-text")
    records = [{"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "hello there"}]},
               {"messages": [{"role": "user", "content": "zz"}, {"role": "assistant", "content": "ok"}]}]
    index = build_corpus_index(records, text_verifier, tmp_path / "i.safetensors", prompt_tokens=2)
    seqs = [s.tolist() for s in np.split(index.tokens, np.flatnonzero(index.tokens == SEP) + 1) if s.size]
    for record, seq in zip(records, seqs):
        ids, plen = tokenize_conversation(text_verifier, record["messages"])
        assert seq[:-1] == ids[plen - 2 :]
    assert "".join(text_verifier.tokenizer.convert_ids_to_tokens(seqs[0][:-1])) == "<|im_end|><|im_start|>hello there<|im_end|>"
    assert index.meta["num_conversations"] == 2 and index.meta["prompt_tokens"] == 2
    assert SuffixArray.load(tmp_path / "i.safetensors", text_verifier).num_tokens == index.num_tokens
    whole = build_corpus_index(records, text_verifier, tmp_path / "w.safetensors", prompt_tokens=-1, limit=1)
    assert whole.tokens[:-1].tolist() == tokenize_conversation(text_verifier, records[0]["messages"])[0]
