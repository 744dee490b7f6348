"""Speculative sampling is lossless: emitted tokens follow the verifier's distribution exactly.

(a) Unit level on ``speculative_sampling`` with fixed target rows p and draft rows q over a
vocabulary of 6: the first emitted token must follow p[0], the second (given the first draft was
accepted) p[1], and so on; checked with a chi-square test over many seeded draws. The same check
must reject deliberately wrong acceptance rules, which shows it has the power to catch a bug.
(b) End to end through the engine with a tiny random Llama (vocabulary 8) at temperature 1 and a
different random model as draft model: the joint distribution of the generated tokens must be the
verifier's own p(x1) p(x2 | x1) p(x3 | x1, x2).

Every random draw is seeded, so each p-value is a fixed number and the tests are deterministic.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from conftest import make_model, make_verifier
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.sampling import SamplingParams
from specheads.decoding.verify import speculative_sampling
from specheads.drafters import DraftModelDrafter, NgramDrafter

# A correct sampler must pass (p > PASS) and a wrong one must be rejected (p < REJECT).
PASS = 1e-3
REJECT = 1e-6


def chi2_sf(stat: float, df: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:  # scipy is in the dev extra; without it, Q(df/2, stat/2) from torch
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return float(chi2.sf(stat, df))


def chisquare_pvalue(observed, probs, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; bins expected to hold fewer than ``min_expected``
    samples are merged into one bin. Any sample in a zero-probability bin gives p = 0."""
    observed = torch.as_tensor(observed, dtype=torch.float64).flatten()
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    assert observed.shape == probs.shape
    assert abs(float(probs.sum()) - 1) < 1e-6, float(probs.sum())
    n = float(observed.sum())
    assert n > 0
    if bool((observed[probs <= 1e-12] > 0).any()):
        return 0.0
    expected = probs * n
    big = expected >= min_expected
    obs = observed[big].tolist()
    exp = expected[big].tolist()
    if bool((~big).any()):
        obs.append(float(observed[~big].sum()))
        exp.append(float(expected[~big].sum()))
    if len(obs) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    return chi2_sf(stat, len(obs) - 1)


def test_chisquare_helper():
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert chisquare_pvalue([500, 300, 200], probs) == pytest.approx(1.0)
    assert chisquare_pvalue([400, 400, 200], probs) < 1e-6
    assert chisquare_pvalue([499, 300, 200, 1], torch.tensor([0.5, 0.3, 0.2, 0.0])) == 0.0
    # The torch fallback agrees with a known value: chi2.sf(3.84, 1) = 0.05.
    assert float(torch.special.gammaincc(torch.tensor(0.5, dtype=torch.float64), torch.tensor(3.841458820694124 / 2, dtype=torch.float64))) == pytest.approx(0.05, abs=1e-6)


# --------------------------------------------------------------------------------------------
# (a) speculative_sampling against fixed p and q

V = 6
# Target rows p[0..3] (k = 3 drafts plus the bonus row) and draft rows q[0..2]. They differ a
# lot, and on purpose in support: q puts mass where p has none (those drafts must always be
# rejected) and p puts mass where q has none (reachable only through the residual).
P = torch.tensor(
    [
        [0.40, 0.25, 0.15, 0.10, 0.10, 0.00],
        [0.05, 0.05, 0.50, 0.20, 0.00, 0.20],
        [0.30, 0.30, 0.10, 0.10, 0.10, 0.10],
        [0.10, 0.20, 0.30, 0.25, 0.10, 0.05],
    ]
)
Q = torch.tensor(
    [
        [0.10, 0.40, 0.15, 0.00, 0.15, 0.20],
        [0.05, 0.05, 0.20, 0.30, 0.30, 0.10],
        [0.60, 0.05, 0.05, 0.10, 0.10, 0.10],
    ]
)
K = Q.shape[0]
N_SAMPLES = 20000


def always_accept(target_probs, draft_tokens, draft_probs, generator=None):
    """Wrong: keeps every draft (emits the drafter's distribution)."""
    k = draft_tokens.numel()
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def accept_with_p_ignoring_q(target_probs, draft_tokens, draft_probs, generator=None):
    """Wrong: accepts draft x with probability p(x) instead of min(1, p(x)/q(x))."""
    k = draft_tokens.numel()
    u = torch.rand(k, generator=generator)
    n = 0
    while n < k and float(u[n]) < float(target_probs[n, draft_tokens[n]]):
        n += 1
    if n == k:
        dist = target_probs[k]
    else:
        q = draft_probs[n] if draft_probs is not None else torch.nn.functional.one_hot(draft_tokens[n], target_probs.shape[-1]).float()
        dist = (target_probs[n] - q).clamp_min(0)
        dist = dist / dist.sum() if dist.sum() > 0 else target_probs[n]
    return n, int(torch.multinomial(dist, 1, generator=generator))


def resample_from_p_on_reject(target_probs, draft_tokens, draft_probs, generator=None):
    """Wrong: correct acceptance test, but a rejection resamples from p instead of the residual."""
    k = draft_tokens.numel()
    idx = torch.arange(k)
    p_x = target_probs[idx, draft_tokens]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs[idx, draft_tokens]
    u = torch.rand(k, generator=generator)
    acc = (u * q_x < p_x).tolist()
    n = 0
    while n < k and acc[n]:
        n += 1
    return n, int(torch.multinomial(target_probs[n], 1, generator=generator))


def run_sampler(sampler, draft_dist: torch.Tensor, with_probs: bool, seed: int = 0, n_samples: int = N_SAMPLES):
    """Counts of the emitted token at each position i (given >= i + 1 tokens were emitted before
    the bonus row), plus how often each number of drafts was accepted.

    Drafts at position i are drawn from ``draft_dist[i]``; ``with_probs`` passes them as the
    drafter's q, else the drafter counts as deterministic (draft_probs=None, q one-hot).
    """
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(draft_dist[i], n_samples, replacement=True, generator=gen) for i in range(K)], 1)
    counts = torch.zeros(K + 1, V)  # counts[i, x]: emitted token i was x
    n_acc = torch.zeros(K + 1)
    draft_probs = draft_dist if with_probs else None
    for s in range(n_samples):
        d = drafts[s]
        n, nxt = sampler(P, d, draft_probs, gen)
        assert 0 <= n <= K and 0 <= nxt < V
        n_acc[n] += 1
        emitted = d[:n].tolist() + [nxt]
        for i, t in enumerate(emitted):
            counts[i, t] += 1
    return counts, n_acc


def first_tokens_pvalues(counts) -> list[float]:
    """p-values of emitted token i against p[i], for each position with enough samples."""
    return [chisquare_pvalue(counts[i], P[i]) for i in range(K + 1) if counts[i].sum() >= 200]


@functools.lru_cache(maxsize=None)
def correct_run(with_probs: bool):
    return run_sampler(speculative_sampling, Q, with_probs)


def test_speculative_sampling_follows_p():
    counts, n_acc = correct_run(True)
    pvals = first_tokens_pvalues(counts)
    assert len(pvals) >= 3, counts.sum(1)  # positions 0, 1, 2 (at least) were tested
    assert min(pvals) > PASS, pvals
    # Draft 1 is accepted with probability sum_x min(p0(x), q0(x)) (Leviathan et al., Thm 3.5).
    beta = float(torch.minimum(P[0], Q[0]).sum())
    observed = float(n_acc[1:].sum()) / N_SAMPLES
    assert observed == pytest.approx(beta, abs=4 * math.sqrt(beta * (1 - beta) / N_SAMPLES))


def test_speculative_sampling_deterministic_drafter_follows_p():
    # draft_probs=None: the drafter is deterministic (q one-hot on its token), however it chose it.
    counts, n_acc = correct_run(False)
    pvals = first_tokens_pvalues(counts)
    assert len(pvals) >= 3, counts.sum(1)
    assert min(pvals) > PASS, pvals
    # A one-hot draft x is accepted with probability p(x): overall sum_x q0(x) p0(x).
    beta = float((P[0] * Q[0]).sum())
    observed = float(n_acc[1:].sum()) / N_SAMPLES
    assert observed == pytest.approx(beta, abs=4 * math.sqrt(beta * (1 - beta) / N_SAMPLES))


@pytest.mark.parametrize(
    "wrong,with_probs",
    [
        (always_accept, True),
        (accept_with_p_ignoring_q, True),
        (resample_from_p_on_reject, True),
        (resample_from_p_on_reject, False),
    ],
    ids=["always-accept", "accept-with-p-ignoring-q", "resample-from-p", "resample-from-p-deterministic"],
)
def test_the_check_rejects_wrong_rules(wrong, with_probs):
    counts, _ = run_sampler(wrong, Q, with_probs, n_samples=N_SAMPLES // 4)
    assert chisquare_pvalue(counts[0], P[0]) < REJECT


def test_speculative_sampling_edge_cases():
    gen = torch.Generator().manual_seed(0)
    # No drafts: a plain draw from p[0].
    n, t = speculative_sampling(P[:1], torch.tensor([], dtype=torch.long), None, gen)
    assert n == 0 and P[0, t] > 0
    # A draft with p(x) = 0 is never accepted, and the recovered token is never x.
    for _ in range(200):
        n, t = speculative_sampling(P[:2], torch.tensor([5]), Q[:1], gen)
        assert n == 0 and t != 5
    # q == p: every draft is accepted.
    for _ in range(200):
        n, t = speculative_sampling(P, torch.tensor([0, 2, 1]), P[:3], gen)
        assert n == 3
    # p one-hot (e.g. greedy): the deterministic drafter's token is kept iff it is p's token.
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 4]), V).float()
    assert speculative_sampling(onehot, torch.tensor([3]), None, gen) == (1, 4)
    assert speculative_sampling(onehot, torch.tensor([2]), None, gen) == (0, 3)


# --------------------------------------------------------------------------------------------
# (b) end to end through the engine

E2E_VOCAB = 8
E2E_PROMPT = [3, 5, 6, 1]
E2E_RUNS = 2000
NGRAM_PROMPT = (0, 1, 2, 3, 4, 5, 6, 7, 2, 4, 6, 0, 3, 6, 1)
E2E_MAX_NEW = 4  # the prefill emits x1; the first verify step drafts 2 tokens (x2, x3)
TINY = dict(vocab=E2E_VOCAB, hidden=16, layers=1, heads=2, init_range=0.3)


@functools.lru_cache(maxsize=None)
def e2e_models():
    verifier = make_verifier("llama", seed=0, **TINY)
    draft = make_model("llama", seed=1, **TINY)
    return verifier, draft


@torch.no_grad()
def exact_joint(model, prompt, steps: int = 3) -> torch.Tensor:
    """[V] * steps tensor: model's p(x1) p(x2 | x1) ... at temperature 1, by full forwards."""
    V = E2E_VOCAB
    joint = torch.ones(1, dtype=torch.float64)
    seqs = torch.tensor([prompt])
    for _ in range(steps):
        probs = torch.softmax(model(input_ids=seqs).logits[:, -1].double(), -1)  # [B, V]
        joint = (joint[:, None] * probs).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return joint.reshape((V,) * steps)


@functools.lru_cache(maxsize=None)
def e2e_samples(kind: str, runs: int, prompt: tuple[int, ...] = tuple(E2E_PROMPT)):
    verifier, draft = e2e_models()
    drafter = {
        "draft_model": lambda: DraftModelDrafter(draft, E2E_VOCAB),
        # q is the draft model's distribution renormalised over 5 of the 8 tokens
        "draft_vocab": lambda: DraftModelDrafter(draft, E2E_VOCAB, draft_vocab=[0, 2, 3, 5, 6]),
        "ngram": NgramDrafter,
    }[kind]()
    decoder = SpeculativeDecoder(verifier, drafter, num_draft_tokens=2)
    sampling = SamplingParams(temperature=1.0)
    counts = torch.zeros((E2E_VOCAB,) * 3)
    drafted = accepted = 0
    for seed in range(runs):
        out = decoder.generate(list(prompt), max_new_tokens=E2E_MAX_NEW, sampling=sampling, seed=seed, eos_token_ids=[])
        assert len(out.token_ids) == E2E_MAX_NEW and out.finish_reason == "length"
        counts[tuple(out.token_ids[:3])] += 1
        drafted += sum(out.stats.drafted_at)
        accepted += sum(out.stats.accepted_at)
    return counts, drafted, accepted


def test_e2e_draft_model_sampling_matches_verifier_distribution():
    verifier, draft = e2e_models()
    counts, drafted, accepted = e2e_samples("draft_model", E2E_RUNS)
    # The runs did speculate: at least 2 drafts per run, some accepted and some rejected.
    assert drafted >= 2 * E2E_RUNS
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)
    p = exact_joint(verifier.model, E2E_PROMPT)
    assert chisquare_pvalue(counts, p) > PASS
    assert chisquare_pvalue(counts.sum(0), p.sum(0)) > PASS  # (x2, x3): the drafted positions
    # The check has power: the same counts are rejected against the draft model's own joint
    # p(x1) q(x2 | x1) q(x3 | x1, x2) (x1 comes from the verifier's prefill).
    q = exact_joint(draft, E2E_PROMPT)
    wrong = p.sum((1, 2))[:, None, None] * q / q.sum((1, 2), keepdim=True)
    assert chisquare_pvalue(counts, wrong) < REJECT


def test_e2e_draft_vocabulary_sampling_matches_verifier_distribution():
    """A draft model scoring only part of the vocabulary: its drafts never leave that part, and the
    output still follows the verifier's distribution (tokens outside it come from the residual)."""
    verifier, _ = e2e_models()
    counts, drafted, accepted = e2e_samples("draft_vocab", E2E_RUNS)
    assert drafted >= 2 * E2E_RUNS and 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)
    p = exact_joint(verifier.model, E2E_PROMPT)
    assert counts[:, :, [1, 4, 7]].sum() > 0  # tokens outside the draft vocabulary are still emitted
    assert chisquare_pvalue(counts, p) > PASS
    assert chisquare_pvalue(counts.sum(0), p.sum(0)) > PASS


def test_e2e_ngram_sampling_matches_verifier_distribution():
    # A deterministic drafter (draft_probs=None). The prompt holds every token, so an n-gram
    # match, and thus a draft, always exists.
    verifier, _ = e2e_models()
    counts, drafted, accepted = e2e_samples("ngram", 600, NGRAM_PROMPT)
    assert drafted >= 2 * 600 and accepted > 0.05 * drafted, (accepted, drafted)
    p = exact_joint(verifier.model, list(NGRAM_PROMPT))
    assert chisquare_pvalue(counts, p) > PASS


def test_seeded_sampling_is_deterministic():
    verifier, draft = e2e_models()
    sampling = SamplingParams(temperature=1.0)

    def run(seed):
        dec = SpeculativeDecoder(verifier, DraftModelDrafter(draft, E2E_VOCAB), num_draft_tokens=2)
        return dec.generate(E2E_PROMPT, max_new_tokens=24, sampling=sampling, seed=seed, eos_token_ids=[]).token_ids

    a, b = run(1234), run(1234)
    assert a == b and len(a) == 24
    assert len({tuple(run(s)) for s in range(5)}) > 1  # and the seed does matter
