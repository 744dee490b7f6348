"""Greedy speculative decoding is lossless: the engine's tokens equal transformers' greedy generate.

For every architecture and drafter (none, n-gram, the verifier itself as draft model, a noisy
copy of the verifier that is right about half the time, an unrelated random model that is almost
always wrong), every draft length and goodput control, the new tokens must be
exactly ``model.generate(do_sample=False)``'s. Also with an eos token in the middle of the
continuation, where drafts run past the eos and the engine must cut there.
"""

from __future__ import annotations


import pytest
import torch

from conftest import EOS, REPETITIVE_PROMPTS, VOCAB, cached_verifier, greedy_reference, hf_greedy, noisy_model
from specheads.decoding import SpeculativeDecoder
from specheads.drafters import DraftModelDrafter, NgramDrafter

N_NEW = 40
DRAFT_VOCAB = [i for i in range(VOCAB) if i % 3]
PROMPTS = REPETITIVE_PROMPTS
reference = greedy_reference


def make_drafter(kind: str | None, arch: str):
    if kind is None:
        return None
    if kind == "ngram":
        return NgramDrafter()
    if kind == "self":
        return DraftModelDrafter(cached_verifier(arch).model, VOCAB)
    if kind == "noisy":
        return DraftModelDrafter(noisy_model(arch), VOCAB)
    if kind == "other":
        return DraftModelDrafter(cached_verifier(arch, 1).model, VOCAB)
    if kind == "noisy_vocab":  # the noisy copy scoring two thirds of the vocabulary: drafts never hold the rest
        return DraftModelDrafter(noisy_model(arch), VOCAB, draft_vocab=DRAFT_VOCAB)
    raise ValueError(kind)


def expected_steps(max_new_tokens: int, k: int) -> int:
    """Verify steps when every draft is accepted: the engine never drafts past max_new_tokens."""
    remaining, steps = max_new_tokens - 1, 0  # the prefill emits the first token
    while remaining > 0:
        remaining -= min(k, remaining - 1) + 1
        steps += 1
    return steps


class RecordingDrafter:
    """Wraps a drafter and records every proposal (to check what was drafted)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.needs_hidden_states = inner.needs_hidden_states
        self.proposals: list[list[int]] = []

    def start(self, prompt_ids):
        self.inner.start(prompt_ids)

    def propose(self, ctx):
        cands = self.inner.propose(ctx)
        self.proposals.append(cands.tokens.tolist())
        return cands

    def observe(self, num_accepted, emitted):
        self.inner.observe(num_accepted, emitted)


class FlatCost:
    """A verify cost that does not grow with the token count, and ignores what it observes."""

    def __call__(self, q):
        return 100.0  # ms: a drafter costs little beside it, as beside a real verifier

    def observe(self, q, seconds):
        pass


CASES = [
    pytest.param(None, 4, False, id="plain"),
    pytest.param(None, 0, False, id="plain-k0"),
    pytest.param("ngram", 1, False, id="ngram-k1"),
    pytest.param("ngram", 3, False, id="ngram-k3"),
    pytest.param("ngram", 5, False, id="ngram-k5"),
    pytest.param("ngram", 5, True, id="ngram-goodput"),
    pytest.param("self", 1, False, id="self-k1"),
    pytest.param("self", 3, False, id="self-k3"),
    pytest.param("self", 5, False, id="self-k5"),
    pytest.param("self", 4, True, id="self-goodput"),
    pytest.param("noisy", 1, False, id="noisy-k1"),
    pytest.param("noisy", 3, False, id="noisy-k3"),
    pytest.param("noisy", 5, False, id="noisy-k5"),
    pytest.param("noisy", 4, True, id="noisy-goodput"),
    pytest.param("other", 3, False, id="other-k3"),
    pytest.param("noisy_vocab", 3, False, id="noisy-draft-vocab-k3"),
]


@pytest.mark.parametrize("kind,k,goodput", CASES)
def test_engine_matches_hf_greedy(arch, verifier, kind, k, goodput):
    accepted = drafted = 0
    for prompt in PROMPTS:
        ref = list(reference(arch, prompt, N_NEW, EOS))
        drafter = make_drafter(kind, arch)
        # goodput: a flat verify cost (a GPU's), so drafts pay and acceptance is exercised
        control = dict(control="goodput", cost=FlatCost()) if goodput else dict(control="fixed")
        decoder = SpeculativeDecoder(verifier, drafter, num_draft_tokens=k, **control)
        out = decoder.generate(list(prompt), max_new_tokens=N_NEW, eos_token_ids=[EOS])
        assert out.token_ids == ref, f"prompt {prompt}: engine {out.token_ids} != HF greedy {ref}"
        assert out.prompt_ids == list(prompt)
        assert out.finish_reason == ("eos" if ref[-1] == EOS else "length")
        assert out.stats.new_tokens == len(ref)
        # Every token after the prefill's is emitted by a verify step.
        assert out.stats.emitted_in_steps == len(ref) - 1
        accepted += sum(out.stats.accepted_at)
        drafted += sum(out.stats.drafted_at)
        if kind is None:
            assert out.stats.drafted_at == [] and out.stats.tau == 1.0
        if kind == "self":
            # The draft model is the verifier: every draft is accepted.
            acc = out.stats.acceptance_per_position
            assert acc and all(a == 1.0 for a in acc), acc
            if not goodput:
                assert len(acc) == k
                if out.finish_reason == "length":
                    steps = expected_steps(N_NEW, k)
                    assert out.stats.verify_steps == steps
                    assert out.stats.tau == pytest.approx((N_NEW - 1) / steps)
                assert out.stats.tau >= min(k + 1, 5.5) - 0.6
    if kind is not None:
        assert drafted > 0
        assert accepted > 0 or kind == "other", f"{kind}: nothing accepted, so the test exercised no acceptance"
        if kind in ("noisy", "other", "noisy_vocab"):
            assert accepted < drafted, f"{kind}: no rejection at all, so the test exercised no rollback"


@pytest.mark.parametrize("kind,k", [(None, 3), ("ngram", 3), ("self", 5), ("noisy", 4), ("other", 3)])
def test_eos_mid_draft(arch, verifier, kind, k):
    """An eos inside the accepted drafts ends generation there (the tokens drafted after it are dropped)."""
    prompt = PROMPTS[0]
    full = list(reference(arch, prompt, 30, EOS))
    # A token whose first occurrence is at position j >= 7 serves as eos. With k = 5 and every
    # draft accepted, verify step s drafts positions 6s+1 .. 6s+5, so (j - 1) % 6 < 4 puts the eos
    # inside a draft with more drafted tokens after it.
    j = next(i for i in range(7, len(full)) if full[i] not in full[:i] and full[i] != EOS and (i - 1) % 6 < 4)
    eos = full[j]
    ref = list(reference(arch, prompt, 30, eos))
    assert ref == full[: j + 1]  # HF stops at, and includes, the eos token
    drafter = make_drafter(kind, arch)
    recorder = RecordingDrafter(drafter) if drafter is not None else None
    out = SpeculativeDecoder(verifier, recorder, num_draft_tokens=k, control="fixed").generate(
        list(prompt), max_new_tokens=30, eos_token_ids=[eos]
    )
    assert out.token_ids == ref
    assert out.finish_reason == "eos"
    assert out.stats.new_tokens == j + 1
    if kind == "self":
        # The verifier-as-drafter drafted past the eos token (and all of it was accepted), so the
        # engine had to cut the accepted run at eos.
        assert any(eos in p[:-1] for p in recorder.proposals), recorder.proposals


def test_default_eos_comes_from_the_verifier():
    """eos_token_ids=None uses the verifier's configured eos ids."""
    from conftest import make_verifier

    v = make_verifier("llama")
    prompt = list(PROMPTS[1])
    full = hf_greedy(v.model, prompt, 20, EOS)
    j = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    v.model.generation_config.eos_token_id = full[j]
    v.model.config.eos_token_id = full[j]
    assert v.eos_token_ids == [full[j]]
    out = SpeculativeDecoder(v, NgramDrafter(), num_draft_tokens=3, control="fixed").generate(prompt, max_new_tokens=20)
    assert out.token_ids == full[: j + 1]
    assert out.finish_reason == "eos"


def test_eos_as_first_token(verifier, arch):
    prompt = list(PROMPTS[2])
    first = reference(arch, PROMPTS[2], N_NEW, EOS)[0]
    out = SpeculativeDecoder(verifier, NgramDrafter(), num_draft_tokens=3, control="fixed").generate(
        prompt, max_new_tokens=N_NEW, eos_token_ids=[first]
    )
    assert out.token_ids == [first]
    assert out.finish_reason == "eos"
    assert out.stats.verify_steps == 0


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_short_max_new_tokens(arch, verifier, n):
    """The engine never drafts past max_new_tokens, and stops at exactly n tokens."""
    prompt = PROMPTS[0]
    ref = list(reference(arch, prompt, N_NEW, EOS))[:n]
    out = SpeculativeDecoder(verifier, make_drafter("self", arch), num_draft_tokens=5, control="fixed").generate(
        list(prompt), max_new_tokens=n, eos_token_ids=[EOS]
    )
    assert out.token_ids == ref
    assert out.finish_reason == "length"
    # A step emits at most k + 1 tokens, so the first verify step drafts min(5, n - 2) tokens.
    assert len(out.stats.drafted_at) == max(0, min(5, n - 2))
    assert out.stats.verify_steps == expected_steps(n, 5)


# --------------------------------------------------------------------------------------------
# The real verifier (slow: converts SmolLM2's GGUF once, ~40 s, then loads from the cache).

CHAT_PROMPTS = [
    "List the days of the week, then list them again in reverse order.",
    "Write a Python function that returns the first n Fibonacci numbers.",
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_smollm2_greedy_lossless(smollm2, kind):
    v = smollm2
    eos = v.eos_token_ids
    accepted = 0
    for text in CHAT_PROMPTS:
        prompt = v.encode(text)
        ids = torch.tensor([prompt])
        ref = v.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48,
            eos_token_id=eos, pad_token_id=v.tokenizer.pad_token_id if v.tokenizer.pad_token_id is not None else eos[0],
        )[0, len(prompt):].tolist()
        drafter = NgramDrafter() if kind == "ngram" else DraftModelDrafter(v.model, v.vocab_size)
        out = SpeculativeDecoder(v, drafter, num_draft_tokens=4, control="fixed").generate(prompt, max_new_tokens=48, eos_token_ids=eos)
        assert out.token_ids == ref, f"{text!r}:\n engine {v.decode(out.token_ids)!r}\n HF     {v.decode(ref)!r}"
        accepted += sum(out.stats.accepted_at)
        if kind == "self":
            assert all(a == 1.0 for a in out.stats.acceptance_per_position)
    assert accepted > 0


class HiddenStatesRecorder(RecordingDrafter):
    """A drafter that asks for the verifier's hidden states and records what it gets."""

    def __init__(self, inner):
        super().__init__(inner)
        self.needs_hidden_states = True
        self.contexts: list[tuple[list[int], tuple]] = []
        self.observed: list[int] = []

    def propose(self, ctx):
        self.contexts.append((list(ctx.tokens), ctx.hidden_states))
        return super().propose(ctx)

    def observe(self, num_accepted, emitted):
        self.observed.append(num_accepted)
        super().observe(num_accepted, emitted)


def test_hidden_states_given_to_drafter(arch, verifier):
    """A drafter with needs_hidden_states gets the verifier's hidden states of the tokens the last
    forward accepted, ending with the row that predicted the pending token; decoding stays lossless."""
    prompt = PROMPTS[0]
    drafter = HiddenStatesRecorder(make_drafter("noisy", arch))
    out = SpeculativeDecoder(verifier, drafter, num_draft_tokens=3, control="fixed").generate(
        list(prompt), max_new_tokens=24, eos_token_ids=[EOS]
    )
    assert out.token_ids == list(reference(arch, prompt, N_NEW, EOS))[:24]
    n_layers = verifier.model.config.num_hidden_layers
    # observe() follows every verify step; propose() every step with room to draft (a draft model
    # always proposes), which is every step but those at the very end.
    assert len(drafter.observed) == out.stats.verify_steps
    assert len(drafter.contexts) == out.stats.drafted_at[0]
    for step, (tokens, hidden) in enumerate(drafter.contexts):
        assert hidden is not None and len(hidden) == n_layers + 1  # embeddings first, then each layer
        with torch.no_grad():
            full = verifier.model(input_ids=torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        m = hidden[0].shape[0]
        if step > 0:  # after a verify step: the pending token of that step plus its accepted drafts
            assert m == drafter.observed[step - 1] + 1
        for h, f in zip(hidden, full):
            assert h.shape == (m, verifier.hidden_size)
            # Row j is the hidden state at position len(tokens) - 1 - m + j; the last row is the
            # one that predicted the pending token tokens[-1].
            assert torch.allclose(h, f[0, len(tokens) - 1 - m : len(tokens) - 1], atol=1e-4)
    assert any(n > 0 for n in drafter.observed)
