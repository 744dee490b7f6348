"""Speculative sampling is lossless: emitted tokens follow the verifier's distribution exactly.

(a) Unit level on ``speculative_sampling`` with fixed target rows p and draft rows q over a
vocabulary of 6: the first emitted token must follow p[0], the second (given the first draft was
accepted) p[1], and so on; checked with a chi-square test over many seeded draws. The same check
must reject deliberately wrong acceptance rules, which shows it has the power to catch a bug.
(b) The first two emitted tokens, sized to catch a small error: a toy "language model" with fixed
target and draft logits for every context over a vocabulary of 4, decoded step by step with
``speculative_sampling`` / ``tree_speculative_sampling`` exactly as the engine does (draft from
the context, verify, continue from the emitted tokens), one drafter of each kind (a draft model,
a draft model with a draft vocabulary, a deterministic drafter like the n-gram one, and a tree
whose siblings are drawn without replacement), at T = 1, T != 1, top-k and top-p. The joint of
the first two emitted tokens (16 cells) must match p(x1) p(x2 | x1); for every drafter kind a
deliberately wrong rule must fail the same test (on a fifth of the samples). See
``test_power_of_the_two_token_test`` for the sample size: a total-variation error of 0.02 in that
joint fails with probability >= 0.99.
(c) End to end through the engine with a tiny random Llama (vocabulary 4) and a different random
model as draft model, one test per drafter kind, with temperature, top-k and top-p: the joint of
the generated tokens must be the verifier's own (warped) p(x1) p(x2 | x1) p(x3 | x1, x2), and the
same test must reject the engine's output when its rule is swapped for a wrong one. EAGLE-3
runs there too, with a randomly initialised ``Eagle3Model`` (q far from one-hot and far from p):
as a chain at T = 0.7 with top-p over a draft vocabulary that lacks a token (q handed to the rule
with the drafts), and as a dynamic tree (tree=4, top_k=2) at T = 1 whose children are chosen,
not sampled (draft_probs None, the tree rule's deterministic branch).

Every random draw is seeded, so each p-value is a fixed number and the tests are deterministic.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random

import pytest
import torch

import specheads.decoding.engine as engine
from conftest import make_model, make_verifier
from specheads.decoding import SpeculativeDecoder
from specheads.decoding.candidates import Candidates, DraftContext
from specheads.decoding.sampling import SamplingParams
from specheads.decoding.verify import speculative_sampling, tree_speculative_sampling
from specheads.drafters import DraftModelDrafter, NgramDrafter
from specheads.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model, draft_vocab_d2t
from specheads.drafters.hybrid import HybridDrafter

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
# (b) the first two emitted tokens, with a sample size that catches a small error

TOY_V = 4  # the joint of two tokens has 16 cells
TOY_K = 2  # drafts per step: chain length, or tree depth
DELTA = 0.02  # a total-variation error this large in the two-token joint ...
POWER = 0.99  # ... must fail (p <= PASS) with at least this probability
TOY_N = 35_000  # samples per run; see test_power_of_the_two_token_test
# A wrong rule must fail the same test on a fifth of the samples: the power only grows with n,
# so it then fails on TOY_N too (any wrong rule with a TV error >= 0.045 fails on 7,000 samples
# with probability >= 0.99, by the computation below).
TOY_N_WRONG = TOY_N // 5


class Toy:
    """A toy verifier and draft model: fixed random logits for every context of up to 3 tokens
    (a step drafts 2 tokens from a context of at most 1), warped by ``sampling`` as the engine
    warps both sides. ``p[c]`` and ``q[c]`` are the verifier's and the drafter's distributions
    after context c. With ``draft_vocab`` the draft logits are -inf outside it before warping
    (as ``DraftModelDrafter`` does); ``q_full`` then keeps the draft model's full-vocabulary
    distribution and ``q_unwarped`` the draft distribution before temperature / top-k / top-p,
    both for wrong rules."""

    def __init__(self, sampling: SamplingParams, draft_vocab=None, seed: int = 0, target_scale: float = 0.8, draft_scale: float = 1.5):
        gen = torch.Generator().manual_seed(seed)
        self.p, self.q, self.q_full, self.q_unwarped = {}, {}, {}, {}
        for length in range(4):
            for c in itertools.product(range(TOY_V), repeat=length):
                target = target_scale * torch.randn(TOY_V, generator=gen)
                draft = draft_scale * torch.randn(TOY_V, generator=gen)
                self.p[c] = sampling.probs(target[None])[0]
                self.q_full[c] = sampling.probs(draft[None])[0]
                if draft_vocab is not None:
                    masked = torch.full_like(draft, float("-inf"))
                    masked[draft_vocab] = draft[draft_vocab]
                    draft = masked
                self.q[c] = sampling.probs(draft[None])[0]
                self.q_unwarped[c] = torch.softmax(draft, -1)
        self.q_cumulative = {c: q.cumsum(0).tolist() for c, q in self.q.items()}
        self._given: dict = {}
        self._rows: dict = {}

    def q_given(self, c, taken: tuple[int, ...]) -> tuple[torch.Tensor, list[float]]:
        """q(. | c) given that siblings ``taken`` were drawn before, without replacement: q with
        those tokens zeroed, renormalised (cached, with its cumulative weights)."""
        key = (c, taken)
        if key not in self._given:
            q = self.q[c].clone()
            q[list(taken)] = 0
            q = q / q.sum()
            self._given[key] = (q, q.cumsum(0).tolist())
        return self._given[key]

    def rows(self, table: str, contexts: tuple) -> torch.Tensor:
        """torch.stack of ``getattr(self, table)[c]`` over contexts (cached)."""
        key = (table, contexts)
        if key not in self._rows:
            rows = getattr(self, table)
            self._rows[key] = torch.stack([rows[c] for c in contexts])
        return self._rows[key]

    def joint(self) -> torch.Tensor:
        """[V, V] float64: p(x1) p(x2 | x1)."""
        p1 = self.p[()].double()
        return torch.stack([p1[a] * self.p[(a,)].double() for a in range(TOY_V)])


def _draw(rng: random.Random, cumulative: list[float]) -> int:
    """A token drawn with the given cumulative weights."""
    return min(bisect.bisect(cumulative, rng.random() * cumulative[-1]), TOY_V - 1)


def chain_step(toy: Toy, rule=speculative_sampling, deterministic: bool = False, reported: str = "q"):
    """One engine step over a chain: draft TOY_K tokens from the context (sampled from q, or,
    when ``deterministic``, q's argmax with draft_probs=None like the n-gram drafter), verify
    with ``rule``, return the emitted tokens. ``reported`` names the q handed to the rule."""
    def step(c, rng, gen):
        drafts: list[int] = []
        for _ in range(TOY_K):
            ctx = c + tuple(drafts)
            drafts.append(int(toy.q[ctx].argmax()) if deterministic else _draw(rng, toy.q_cumulative[ctx]))
        contexts = tuple(c + tuple(drafts[:i]) for i in range(TOY_K + 1))
        target = toy.rows("p", contexts)
        probs = None if deterministic else toy.rows(reported, contexts[:TOY_K])
        n, nxt = rule(target, torch.tensor(drafts), probs, gen)
        return tuple(drafts[:n]) + (nxt,)

    return step


def tree_without_replacement_step(toy: Toy, conditional: bool = True, width: int = 2):
    """One engine step over a depth-2 tree: ``width`` children of the root drawn from q WITHOUT
    replacement, and under each of them ``width`` children drawn the same way. The correct
    draft_probs of a sibling is q given the earlier siblings (q with their tokens zeroed,
    renormalised); ``conditional=False`` hands the rule the unconditional q instead (wrong)."""

    def step(c, rng, gen):
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[torch.Tensor] = []
        paths: list[tuple[int, ...]] = []

        def siblings(prefix: tuple[int, ...], parent: int):
            taken: tuple[int, ...] = ()
            for _ in range(width):
                q, cumulative = toy.q_given(c + prefix, taken)
                t = _draw(rng, cumulative)
                tokens.append(t)
                parents.append(parent)
                paths.append(prefix + (t,))
                probs.append(q if conditional else toy.q[c + prefix])
                taken += (t,)

        siblings((), -1)
        for i in range(width):
            siblings(paths[i], i)
        target = toy.rows("p", (c, *(c + path for path in paths)))
        cands = Candidates(torch.tensor(tokens), torch.tensor(parents), torch.stack(probs))
        path, nxt = tree_speculative_sampling(target, cands, gen)
        return tuple(tokens[i] for i in path) + (nxt,)

    return step


SAMPLINGS = {
    "T=1": SamplingParams(temperature=1.0),
    "T=0.7": SamplingParams(temperature=0.7),
    "top-k=2": SamplingParams(temperature=1.0, top_k=2),
    "T=0.8,top-p=0.8": SamplingParams(temperature=0.8, top_p=0.8),
    "top-p=0.8": SamplingParams(temperature=1.0, top_p=0.8),
}
DRAFT_VOCAB = [0, 2, 3]  # the toy draft model with a draft vocabulary never drafts token 1

# case id -> (drafter kind, sampling, the step built from the Toy)
CASES = {
    # correct rules: must pass
    "draft-model,T=1": ("draft_model", "T=1", lambda toy: chain_step(toy)),
    "draft-model,T=0.7": ("draft_model", "T=0.7", lambda toy: chain_step(toy)),
    "draft-model,top-k=2": ("draft_model", "top-k=2", lambda toy: chain_step(toy)),
    "draft-model,T=0.8,top-p=0.8": ("draft_model", "T=0.8,top-p=0.8", lambda toy: chain_step(toy)),
    "draft-vocab,top-p=0.8": ("draft_vocab", "top-p=0.8", lambda toy: chain_step(toy)),
    "deterministic,T=1": ("deterministic", "T=1", lambda toy: chain_step(toy, deterministic=True)),
    "tree-without-replacement,T=1": ("tree", "T=1", lambda toy: tree_without_replacement_step(toy)),
    # wrong rules: must fail the same test (on TOY_N_WRONG samples)
    "WRONG draft-model,T=1,always-accept": ("draft_model", "T=1", lambda toy: chain_step(toy, always_accept)),
    "WRONG draft-model,T=1,accept-with-p-ignoring-q": ("draft_model", "T=1", lambda toy: chain_step(toy, accept_with_p_ignoring_q)),
    "WRONG draft-model,T=0.7,q-not-warped": ("draft_model", "T=0.7", lambda toy: chain_step(toy, reported="q_unwarped")),
    "WRONG draft-vocab,top-p=0.8,q-over-full-vocab": ("draft_vocab", "top-p=0.8", lambda toy: chain_step(toy, reported="q_full")),
    "WRONG deterministic,T=1,always-accept": ("deterministic", "T=1", lambda toy: chain_step(toy, always_accept, deterministic=True)),
    "WRONG deterministic,T=1,resample-from-p": ("deterministic", "T=1", lambda toy: chain_step(toy, resample_from_p_on_reject, deterministic=True)),
    "WRONG tree-without-replacement,T=1,unconditional-q": ("tree", "T=1", lambda toy: tree_without_replacement_step(toy, conditional=False)),
}


@functools.lru_cache(maxsize=None)
def toy_for(kind: str, sampling: str) -> Toy:
    return Toy(SAMPLINGS[sampling], draft_vocab=DRAFT_VOCAB if kind == "draft_vocab" else None)


@functools.lru_cache(maxsize=None)
def two_token_run(case: str, n: int = TOY_N, seed: int = 0):
    """Decode the toy until two tokens are out, ``n`` times. Returns the [V, V] counts of the
    first two emitted tokens, the exact joint p(x1) p(x2 | x1), and the number of first steps
    that accepted at least one draft."""
    kind, sampling, build = CASES[case]
    toy = toy_for(kind, sampling)
    step = build(toy)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(TOY_V, TOY_V)
    first_accepted = 0
    for _ in range(n):
        out = step((), rng, gen)
        first_accepted += len(out) > 1
        while len(out) < 2:
            out += step(out, rng, gen)
        counts[out[0], out[1]] += 1
    return counts, toy.joint(), first_accepted


def total_variation(counts, probs) -> float:
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def power(n: int, delta: float, df: int, alpha: float = PASS) -> float:
    """Probability that Pearson's chi-square test at level ``alpha`` with ``df`` degrees of
    freedom rejects n samples from a distribution at total variation ``delta`` from the null:
    at least P(noncentral chi2(df, 4 n delta^2) > chi2_{1-alpha}(df)) (see the test below)."""
    from scipy.stats import chi2, ncx2

    return float(ncx2.sf(chi2.isf(alpha, df), df, 4 * n * delta**2))


def test_power_of_the_two_token_test():
    """Why TOY_N = 35,000: a TV error of 0.02 in the first two tokens fails with prob >= 0.99.

    Let p0 be the true joint of (x1, x2) over its m <= 16 cells of positive probability and p1
    the sampler's, with TV(p0, p1) = delta. Pearson's statistic X^2 on n samples of p1 is
    (asymptotically) noncentral chi-square with m - 1 degrees of freedom and noncentrality
    lambda = n * sum_x (p1(x) - p0(x))^2 / p0(x). By Cauchy-Schwarz,
    (sum_x |p1 - p0|)^2 <= sum_x (p1 - p0)^2 / p0 * sum_x p0, so lambda >= n (2 delta)^2 = 4 n delta^2,
    whatever the shape of the error. The test rejects when p <= PASS = 1e-3, i.e. X^2 > 37.70
    for df = 15; P(ncx2(15, lambda) > 37.70) >= 0.99 needs lambda >= 55.2, so
    n >= 55.2 / (4 * 0.02^2) = 34,476; TOY_N = 35,000 gives lambda >= 56.0, power 0.991. Fewer
    cells (top-k / top-p zero some) only lower df, and the power at a given lambda rises as df
    falls. Mass eps that p1 puts where p0 = 0 fails the test at the first such sample: none in
    n draws has probability (1 - eps)^n <= 0.01 once eps >= 4.6 / n = 1.3e-4, and a smaller eps
    leaves at least 2 delta - eps of L1 error on p0's support, lambda >= 55.6. The bound needs no
    merged cells: every test below checks that each cell with p0 > 0 expects >= 5 samples. A
    seeded Monte-Carlo run checks the asymptotics on this toy's joint, with the error spread in
    proportion to p0 (the alternative that attains the Cauchy-Schwarz bound).
    """
    pytest.importorskip("scipy")
    assert power(TOY_N, DELTA, TOY_V**2 - 1) >= POWER
    assert power(34_000, DELTA, TOY_V**2 - 1) < POWER  # and TOY_N is not far above the need
    for df in range(1, TOY_V**2 - 1):
        assert power(TOY_N, DELTA, df) >= power(TOY_N, DELTA, TOY_V**2 - 1)
    # Monte Carlo: p1 = p0 (1 + t s), s = +-1 on two halves of p0's mass, t set so TV = 0.02.
    p0 = toy_for("draft_model", "T=1").joint().flatten()
    order = torch.argsort(p0, descending=True)
    s = torch.zeros_like(p0)
    plus = minus = 0.0
    for i in order.tolist():  # greedy balance of the two halves
        if plus <= minus:
            s[i], plus = 1.0, plus + float(p0[i])
        else:
            s[i], minus = -1.0, minus + float(p0[i])
    s = s - float((p0 * s).sum())  # sum p0 * s = 0, so p1 sums to 1
    t = 2 * DELTA / float((p0 * s.abs()).sum())
    p1 = p0 * (1 + t * s)
    assert float(p1.min()) >= 0 and 0.5 * float((p1 - p0).abs().sum()) == pytest.approx(DELTA)
    torch.manual_seed(0)
    reps = 400
    samples = torch.distributions.Multinomial(TOY_N, probs=p1).sample((reps,))
    rejected = sum(chisquare_pvalue(row, p0) <= PASS for row in samples)
    assert rejected >= 0.97 * reps, rejected  # 0.99 expected; 0.97 leaves Monte-Carlo slack


def assert_no_merged_cells(probs, n):
    expected = probs * n
    assert bool((expected[probs > 0] >= 5).all()), float(expected[probs > 0].min())


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("WRONG")])
def test_first_two_tokens_follow_p(case):
    counts, joint, first_accepted = two_token_run(case)
    assert_no_merged_cells(joint, TOY_N)
    # The steps did speculate: the first step accepted a draft in some runs but not all.
    assert 0.05 * TOY_N < first_accepted < 0.95 * TOY_N, first_accepted
    assert chisquare_pvalue(counts, joint) > PASS, total_variation(counts, joint)
    if CASES[case][0] == "draft_vocab":
        assert counts[:, 1].sum() > 0.01 * TOY_N  # token 1 is never drafted, yet emitted


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("WRONG")])
def test_the_two_token_check_rejects_wrong_rules(case):
    """Each wrong rule is a bug a drafter of that kind could meet: keeping every draft, ignoring q,
    a q that is not the one the drafts were drawn from (unwarped, over the full vocabulary instead
    of the draft vocabulary, or unconditional for siblings drawn without replacement), or a
    rejection that resamples from p instead of the residual."""
    counts, joint, _ = two_token_run(case, TOY_N_WRONG)
    assert chisquare_pvalue(counts, joint) < REJECT, total_variation(counts, joint)


# --------------------------------------------------------------------------------------------
# (c) end to end through the engine

E2E_VOCAB = 4
E2E_PROMPT = (3, 1, 2, 0, 2)  # holds every token, so the n-gram drafter always finds a match
E2E_RUNS = 1500
E2E_RUNS_WRONG = E2E_RUNS // 5  # a wrong rule must fail on a fifth of the runs (as in (b))
E2E_MAX_NEW = 4  # the prefill emits x1; the first verify step drafts 2 tokens (x2, x3)
TINY = dict(vocab=E2E_VOCAB, hidden=16, layers=1, heads=2, init_range=0.3)
E2E_DRAFT_VOCAB = [0, 2, 3]  # the draft model with a draft vocabulary never drafts token 1

# kind -> sampling; together they cover temperature, top-k, top-p and a draft vocabulary with top-p.
E2E_SAMPLING = {
    "draft_model": SamplingParams(temperature=0.7, top_k=3),
    "draft_vocab": SamplingParams(temperature=1.0, top_p=0.8),
    "ngram": SamplingParams(temperature=1.3, top_p=0.9),
    # EAGLE-3 as a chain over the draft vocabulary E2E_DRAFT_VOCAB: drafts sampled from the warped q
    "eagle3_chain": SamplingParams(temperature=0.7, top_p=0.9),
    # EAGLE-3 as a dynamic tree of 4 nodes, top-2 children per node: drafts chosen, draft_probs None
    "eagle3_tree": SamplingParams(temperature=1.0),
    # goodput control (the default) cutting what is verified, at T = 0.7: the whole dynamic tree
    # (cut to its most probable nodes), the sampled chain (cut to a prefix), and a hybrid of the
    # tree with the n-gram lookup (merged into one tree, then cut)
    "eagle3_tree_goodput": SamplingParams(temperature=0.7),
    "eagle3_chain_goodput": SamplingParams(temperature=0.7, top_p=0.9),
    "hybrid_goodput": SamplingParams(temperature=0.7),
}
# The verify cost goodput control reads in the e2e tests: each node adds a twentieth of a one-token
# forward, so nodes the calibrated estimates rate unlikely are dropped and the rest verified.
E2E_GOODPUT_COST_MS = (40.0, 2.0)
E2E_DRAFT_VOCAB_KINDS = ("draft_vocab", "eagle3_chain")  # token 1 can only come from the verifier


@functools.lru_cache(maxsize=None)
def e2e_models():
    verifier = make_verifier("llama", seed=0, **TINY)
    draft = make_model("llama", seed=1, **TINY)
    return verifier, draft


@torch.no_grad()
def exact_joint(model, prompt, steps: int = 3, sampling: SamplingParams | None = None) -> torch.Tensor:
    """[V] * steps tensor: model's p(x1) p(x2 | x1) ... by full forwards, at temperature 1 or
    warped by ``sampling`` (as the engine warps: temperature, top-k, top-p)."""
    seqs = torch.tensor([list(prompt)])
    joint = torch.ones(1, dtype=torch.float64)
    V = None
    for _ in range(steps):
        logits = model(input_ids=seqs).logits[:, -1]
        V = logits.shape[-1]
        probs = (sampling.probs(logits) if sampling is not None else torch.softmax(logits.float(), -1)).double()  # [B, V]
        joint = (joint[:, None] * probs).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return joint.reshape((V,) * steps)


@functools.lru_cache(maxsize=None)
def e2e_eagle3_model(draft_vocab: tuple[int, ...] | None = None) -> Eagle3Model:
    """A randomly initialised EAGLE-3 drafter for the e2e verifier (its one layer's output, as the
    three aux features): its q is a smooth function of the verifier's features, far from one-hot
    and from p (``test_e2e_eagle3_drafter_is_not_the_verifier``)."""
    verifier, _ = e2e_models()
    ids = torch.tensor(draft_vocab if draft_vocab is not None else range(E2E_VOCAB))
    cfg = Eagle3Config.from_verifier(verifier, len(ids), [1, 1, 1])
    torch.manual_seed(3)
    model = Eagle3Model(cfg, d2t=draft_vocab_d2t(ids))
    with torch.no_grad():  # logits of a few units, not nn.Linear's near-uniform start
        model.lm_head.weight.mul_(4.0)
    return model


def e2e_drafter(kind: str):
    verifier, draft = e2e_models()
    return {
        "draft_model": lambda: DraftModelDrafter(draft, E2E_VOCAB),
        # q is the draft model's distribution renormalised over 3 of the 4 tokens, then top-p
        "draft_vocab": lambda: DraftModelDrafter(draft, E2E_VOCAB, draft_vocab=E2E_DRAFT_VOCAB),
        "ngram": NgramDrafter,
        # q: the EAGLE-3 head's logits over 3 of the 4 tokens (-inf on token 1), warped
        "eagle3_chain": lambda: Eagle3Drafter(e2e_eagle3_model(tuple(E2E_DRAFT_VOCAB)), verifier, tree="chain"),
        "eagle3_tree": lambda: Eagle3Drafter(e2e_eagle3_model(), verifier, tree=4, top_k=2),
        "eagle3_tree_goodput": lambda: Eagle3Drafter(e2e_eagle3_model(), verifier, tree="auto", top_k=2),
        "eagle3_chain_goodput": lambda: Eagle3Drafter(e2e_eagle3_model(tuple(E2E_DRAFT_VOCAB)), verifier, tree="chain"),
        "hybrid_goodput": lambda: HybridDrafter([Eagle3Drafter(e2e_eagle3_model(), verifier, tree="auto", top_k=2), NgramDrafter()]),
    }[kind]()


class E2ECost:
    """A fixed verify cost in ms (``E2E_GOODPUT_COST_MS``: base + per token), deaf to what it observes."""

    def __call__(self, q):
        base, per = E2E_GOODPUT_COST_MS
        return base + per * q

    def observe(self, q, seconds):
        pass


def e2e_decoder(kind: str):
    verifier, _ = e2e_models()
    if kind.endswith("_goodput"):
        return SpeculativeDecoder(verifier, e2e_drafter(kind), num_draft_tokens=2, control="goodput", cost=E2ECost())
    return SpeculativeDecoder(verifier, e2e_drafter(kind), num_draft_tokens=2, control="fixed")


def tree_always_accept(target_probs, candidates, generator=None):
    """Wrong (trees): keeps the first child at every node down to a leaf, then draws from p there."""
    from specheads.decoding.tree import tree_children

    children = tree_children(candidates.parents)
    path, row = [], 0
    while children[row]:
        path.append(children[row][0])
        row = path[-1] + 1
    return path, int(torch.multinomial(target_probs[row], 1, generator=generator))


def tree_resample_from_p_on_reject(target_probs, candidates, generator=None):
    """Wrong (trees): the right walk, but the final token is drawn from the verifier's p at the
    last accepted row, not from p with the rejected children's tokens zeroed (the residual)."""
    path, _ = tree_speculative_sampling(target_probs, candidates, generator)
    row = path[-1] + 1 if path else 0
    return path, int(torch.multinomial(target_probs[row], 1, generator=generator))


# name -> (wrong chain rule, wrong tree rule) swapped into the engine by e2e_samples
E2E_WRONG = {
    "always-accept": (always_accept, tree_always_accept),
    "resample-from-p": (resample_from_p_on_reject, tree_resample_from_p_on_reject),
}


@functools.lru_cache(maxsize=None)
def e2e_samples(kind: str, wrong: str | None = None, runs: int = E2E_RUNS):
    """Counts [V, V, V] of the first three generated tokens over ``runs`` seeds; with ``wrong``
    (a name in E2E_WRONG) the engine's speculative_sampling and tree_speculative_sampling are
    swapped for that wrong rule's for these runs."""
    decoder = e2e_decoder(kind)
    counts = torch.zeros((E2E_VOCAB,) * 3)
    drafted = accepted = 0
    real, real_tree = engine.speculative_sampling, engine.tree_speculative_sampling
    engine.speculative_sampling, engine.tree_speculative_sampling = E2E_WRONG[wrong] if wrong else (real, real_tree)
    try:
        for seed in range(runs):
            out = decoder.generate(list(E2E_PROMPT), max_new_tokens=E2E_MAX_NEW, sampling=E2E_SAMPLING[kind], seed=seed, eos_token_ids=[])
            assert len(out.token_ids) == E2E_MAX_NEW and out.finish_reason == "length"
            counts[tuple(out.token_ids[:3])] += 1
            drafted += sum(out.stats.drafted_at)
            accepted += sum(out.stats.accepted_at)
    finally:
        engine.speculative_sampling, engine.tree_speculative_sampling = real, real_tree
    return counts, drafted, accepted


@pytest.mark.parametrize("kind", list(E2E_SAMPLING))
def test_e2e_sampling_matches_verifier_distribution(kind):
    """One engine run per drafter kind: the joint of (x1, x2, x3) (64 cells; x2 and x3 come from
    the first verify step's 2 drafts) and of (x2, x3) must be the verifier's own warped joint,
    and the same test must reject the engine with an always-accept rule. With 1,500 runs and
    at most 63 degrees of freedom this catches a TV error of 0.12 with probability >= 0.99
    (lambda >= 4 n delta^2 = 87); the 0.02 guarantee comes from the rule-level tests in (b),
    these check the engine's plumbing (rows, warping of both sides, rollback) per drafter."""
    verifier, _ = e2e_models()
    counts, drafted, accepted = e2e_samples(kind)
    # The runs did speculate: drafts were made, some accepted and some rejected.
    # (goodput control may cut a step's drafts to none: then it drafted less, but still often)
    assert drafted >= E2E_RUNS // (2 if kind.endswith("_goodput") else 1) and 0.05 * drafted < accepted < 0.95 * drafted, (accepted, drafted)
    p = exact_joint(verifier.model, E2E_PROMPT, sampling=E2E_SAMPLING[kind])
    assert chisquare_pvalue(counts, p) > PASS, total_variation(counts, p)
    assert chisquare_pvalue(counts.sum(0), p.sum(0)) > PASS  # (x2, x3): the drafted positions
    if kind in E2E_DRAFT_VOCAB_KINDS:
        assert counts[:, :, 1].sum() > 0  # a token outside the draft vocabulary is still emitted at x3
    # Power: the engine with a wrong rule fails the same test.
    wrong, _, _ = e2e_samples(kind, wrong="always-accept", runs=E2E_RUNS_WRONG)
    assert chisquare_pvalue(wrong, p) < REJECT, total_variation(wrong, p)


@pytest.mark.parametrize("kind", ["eagle3_chain", "eagle3_tree", "hybrid_goodput"])
def test_e2e_eagle3_rejects_a_subtler_wrong_rule(kind):
    """Beyond always-accept: a rejection that draws from p instead of the residual (for the chain
    p instead of max(0, p - q); for the tree p without the rejected children's tokens zeroed) must
    fail the engine test too, on a fifth of its runs. (Handing the rule draft_probs=None for the
    chain's sampled drafts is no such bug: the one-hot rule is lossless for a draft drawn
    independently of the verifier, only less often accepted.)"""
    verifier, _ = e2e_models()
    p = exact_joint(verifier.model, E2E_PROMPT, sampling=E2E_SAMPLING[kind])
    wrong, _, _ = e2e_samples(kind, wrong="resample-from-p", runs=E2E_RUNS_WRONG)
    assert chisquare_pvalue(wrong, p) < REJECT, total_variation(wrong, p)


def test_e2e_draft_model_is_not_the_verifier():
    """The draft model's own joint is far from the verifier's, so a rule that let the drafts
    through would show (x1 comes from the verifier's prefill either way)."""
    verifier, draft = e2e_models()
    sampling = E2E_SAMPLING["draft_model"]
    counts, _, _ = e2e_samples("draft_model")
    p = exact_joint(verifier.model, E2E_PROMPT, sampling=sampling)
    # p(x1) q(x2, x3 | x1), with q's joint computed after each x1
    q = torch.stack([exact_joint(draft, E2E_PROMPT + (x1,), steps=2, sampling=sampling) for x1 in range(E2E_VOCAB)])
    wrong = p.sum((1, 2))[:, None, None] * q
    assert chisquare_pvalue(counts, wrong) < REJECT


def test_e2e_eagle3_drafter_is_not_the_verifier():
    """The EAGLE-3 drafters of the engine test draft from a q far from one-hot and far from p:
    at the first verify step, after each x1, q(x2) (the chain's, handed to the rule, and the
    full-vocabulary one the tree chooses its children from) is at total variation >= 0.2 from
    the verifier's warped p(x2 | x1) and puts at most 0.8 on any token. The tree really branches."""
    verifier, _ = e2e_models()
    for kind in ("eagle3_chain", "eagle3_tree"):
        sampling = E2E_SAMPLING[kind]
        model = e2e_eagle3_model(tuple(E2E_DRAFT_VOCAB) if kind == "eagle3_chain" else None)
        drafter = Eagle3Drafter(model, verifier, tree="chain")  # the chain's q is the tree's too
        for x1 in range(E2E_VOCAB):
            prompt = list(E2E_PROMPT)
            with torch.no_grad():
                out = verifier.model(input_ids=torch.tensor([prompt + [x1]]), output_hidden_states=True)
            p = sampling.probs(out.logits[0, -1:])[0]
            hidden = tuple(out.hidden_states[i][0, :-1] for i in drafter.hidden_layers)
            drafter.start(prompt)
            cands = drafter.propose(DraftContext(prompt + [x1], 2, sampling, torch.Generator().manual_seed(0), hidden))
            q = cands.draft_probs[0]
            assert 0.5 * float((p - q).abs().sum()) >= 0.2, (kind, x1, p, q)
            assert float(q.max()) <= 0.8, (kind, x1, q)
            if kind == "eagle3_chain":
                assert float(q[1]) == 0.0  # outside the draft vocabulary
        if kind == "eagle3_tree":
            tree = Eagle3Drafter(model, verifier, tree=4, top_k=2)
            tree.start(prompt)
            cands = tree.propose(DraftContext(prompt + [x1], 2, sampling, None, hidden))
            assert cands.draft_probs is None and len(cands) == 4 and cands.parents.tolist().count(-1) == 2


def test_seeded_sampling_is_deterministic():
    verifier, draft = e2e_models()
    sampling = SamplingParams(temperature=1.0)

    def run(seed):
        dec = SpeculativeDecoder(verifier, DraftModelDrafter(draft, E2E_VOCAB), num_draft_tokens=2, control="fixed")
        return dec.generate(list(E2E_PROMPT), max_new_tokens=24, sampling=sampling, seed=seed, eos_token_ids=[]).token_ids

    a, b = run(1234), run(1234)
    assert a == b and len(a) == 24
    assert len({tuple(run(s)) for s in range(5)}) > 1  # and the seed does matter
