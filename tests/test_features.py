"""The verifier's per-token features on disk (training.features): captured from a generation pass
equal a teacher-forced forward's, stored and read back by tokens, never mixed across verifiers,
dtypes or aux layers, and shared between processes."""

from __future__ import annotations

import torch

from conftest import EOS, PAD, cached_verifier, make_verifier
from specheads.training.data import generate_self_distillation
from specheads.training.features import UNKNOWN_ARGMAX, FeatureCapture, FeatureStore, features_from_generation, tokens_key

AUX = [1, 2]  # tiny models have 2 layers: the input to layer 1 and the final norm's output (id 2)


def teacher_forced(v, ids):
    with torch.no_grad():
        out = v.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i][0] for i in AUX], -1)
    return aux, out.hidden_states[-1][0], out.logits[0].argmax(-1)


def test_generation_capture_equals_a_teacher_forced_forward():
    v = cached_verifier("llama")
    prompts = [[3, 9, 27, 40, 11], [5, 6], [17, 33, 2 + 1, 8]]  # different lengths: left padding
    width = max(map(len, prompts))
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    with FeatureCapture(v.model, AUX) as cap, torch.no_grad():
        out = v.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=9, eos_token_id=EOS, pad_token_id=PAD)
    answers = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t == EOS), None)
        answers.append(row if stop is None else row[: stop + 1])
    rows = features_from_generation(cap, width, [len(p) for p in prompts], answers, max_length=12)
    for p, a, (aux, last, argmax) in zip(prompts, answers, rows):
        seq = (p + a)[:12]
        assert aux.shape == (len(seq), 2 * 32) and last.shape == (len(seq), 32)
        ref_aux, ref_last, ref_arg = teacher_forced(v, seq)
        ran = min(len(seq), len(p) + len(a) - 1)  # the last token of a conversation is never run
        torch.testing.assert_close(aux[:ran], ref_aux[:ran], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last[:ran], ref_last[:ran], atol=1e-4, rtol=1e-4)
        assert not aux[ran:].any()
        # argmax from the last prompt position on: the verifier's next token (greedy)
        assert argmax[len(p) - 1 : ran].tolist() == ref_arg[len(p) - 1 : ran].tolist()
        # before it generate computed no logits: unknown, which evaluation leaves out (not a miss)
        assert (argmax[: len(p) - 1] == UNKNOWN_ARGMAX).all()


def test_store_round_trip_and_two_writers(tmp_path):
    v = cached_verifier("qwen2")
    a = FeatureStore(tmp_path, v, AUX)
    b = FeatureStore(tmp_path, v, AUX)  # another process, same folder
    seqs = [[3, 4, 5, 6], [7, 8, 9]]
    feats = [teacher_forced(v, s) for s in seqs]
    a.put([(tokens_key(seqs[0]), *feats[0])])
    b.put([(tokens_key(seqs[1]), *feats[1])])
    assert a.has(tokens_key(seqs[1])) and b.has(tokens_key(seqs[0]))  # each sees the other's segment
    aux, last, argmax = a.get([tokens_key(s) for s in seqs], 5, "cpu")
    assert aux.shape == (2, 5, 64) and last.shape == (2, 5, 32) and argmax.shape == (2, 5)
    torch.testing.assert_close(aux[1, :3], feats[1][0])
    torch.testing.assert_close(last[0, :4], feats[0][1])
    assert argmax[0, :4].tolist() == feats[0][2].tolist() and not aux[1, 3:].any()
    assert not a.has(tokens_key([3, 4, 5]))  # a prefix is another sequence


def test_other_dtype_aux_or_verifier_is_not_reused_and_said(tmp_path):
    v = cached_verifier("llama")
    FeatureStore(tmp_path, v, AUX).put([(tokens_key([1, 2, 3]), *teacher_forced(v, [1, 2, 3]))])
    said = []
    other_aux = FeatureStore(tmp_path, v, [1], say=said.append)
    assert not other_aux.has(tokens_key([1, 2, 3]))
    assert any("aux_layer_ids [1, 2] (this run: [1])" in m for m in said), said
    said.clear()
    v16 = make_verifier("llama")
    v16.model.to(torch.bfloat16)
    assert not FeatureStore(tmp_path, v16, AUX, say=said.append).has(tokens_key([1, 2, 3]))
    assert any("dtype float32 (this run: bfloat16)" in m for m in said), said
    said.clear()
    FeatureStore(tmp_path, make_verifier("llama", seed=5), AUX, say=said.append)
    assert any("another verifier" in m for m in said), said


def test_self_distillation_stores_the_features_of_what_it_writes(tmp_path):
    from test_data import tiny_verifier

    v = tiny_verifier(0)
    store = FeatureStore(tmp_path / "features", v, AUX)
    data = generate_self_distillation(v, ["hello there", "what is rain?", "count to five"], tmp_path / "sd",
                                      max_new_tokens=8, batch_size=2, progress=False, capture=(store, AUX, 64))
    for ids in data["input_ids"]:
        key = tokens_key(ids[:64])
        assert store.has(key)
        aux, last, _ = store.get([key], len(ids), "cpu")
        ref_aux, ref_last, _ = teacher_forced(v, ids)
        torch.testing.assert_close(aux[0, : len(ids) - 1], ref_aux[:-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last[0, : len(ids) - 1], ref_last[:-1], atol=1e-4, rtol=1e-4)


def test_multi_turn_conversations_are_answered_on_policy_turn_by_turn(tmp_path):
    """Round 2 asks the second user turn after the verifier's own first answer; the record is the
    whole conversation, its prompt what came before the first answer, and only the whole
    conversation's features are stored."""
    from test_data import tiny_verifier

    v = tiny_verifier(0)
    store = FeatureStore(tmp_path / "features", v, AUX)
    script = {"user_turns": ["what is rain?", "and snow?"]}
    data = generate_self_distillation(v, [script, "count to five"], tmp_path / "sd", max_new_tokens=6, batch_size=2,
                                      progress=False, capture=(store, AUX, 512))
    rec = next(r for r in data if len(r["messages"]) == 4)
    first = v.encode("what is rain?")
    with torch.no_grad():
        a1 = v.model.generate(torch.tensor([first]), do_sample=False, max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS)[0, len(first):].tolist()
    a1 = a1[: a1.index(EOS) + 1] if EOS in a1 else a1
    assert rec["messages"][1] == {"role": "assistant", "content": v.decode(a1)}
    second = v.encode([{"role": "user", "content": "what is rain?"}, rec["messages"][1], {"role": "user", "content": "and snow?"}])
    assert rec["input_ids"][: len(second)] == second and rec["prompt_length"] == len(first)
    assert rec["input_ids"][:len(first)] == first
    assert store.has(tokens_key(rec["input_ids"]))
    assert not store.has(tokens_key(first + a1))  # the first round's conversation is not a training example
