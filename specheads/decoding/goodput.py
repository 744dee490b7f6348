"""Goodput control: each step, run the drafters and verify the candidates that are worth what they cost.

A verify step that keeps a set S of candidate nodes emits on average ``1 + sum_{v in S} P(v)``
tokens, where P(v) is the probability that the verifier accepts the whole path to v, and it costs
``draft + c(|S| + 1)`` seconds: ``draft`` is the drafting time of the drafters that ran, c the
verifier's forward cost for q tokens (measured on this machine and refined from every step).

What is maximised is the generation's goodput, its tokens over its seconds, not each step's own
ratio: steps differ (a long lookup match, then new text), and a ratio of sums is not maximised by
maximising each term's ratio. So every choice weighs expected tokens against seconds at the
generation's running goodput R (``goodput``: tokens per second of its recent steps; plain
decoding's ``1 / c(1)`` before any): a choice pays when it adds more than R times the seconds it
adds (Dinkelbach's method for a ratio of sums). Each step the controller

1. **plans** which drafters run, one at a time and cheapest first (``order``, ``should_run``):
   lookups (n-gram, suffix), which cost next to nothing, propose first; a drafter that costs time
   (EAGLE-3, Medusa, a draft model) then runs only if what it is expected to add, given what the
   drafters before it already offer this step, pays for its drafting time and extra nodes. What it
   adds (accepted tokens and verified nodes the earlier drafters had not proposed) is learned from
   the verify result of every step it runs, per *bucket* of that offer (the expected accepted
   tokens of the best selection from the earlier proposals): after a long, confident suffix match
   the model drafter mostly proposes what the lookup did and is skipped; with no match it is run.
   A skipped drafter is tried again after 4, 8, then at most 16 skips in that bucket, since the
   text may have changed, and a drafter that runs but whose nodes are never verified has one
   verified now and then. A drafter that drafts level by level asks ``DraftContext.keep_going``
   before each level, which says yes while the level's expected tokens are worth its measured time;
2. **selects** (``select``): the proposals are merged into one tree (a node proposed by two
   drafters is one node), P(v) is estimated for every node, and the N nodes with the highest P are
   kept, N (0 = a plain step) maximising ``sum P - R c(N + 1)``. A child never scores above its
   parent, so the kept nodes form a tree, and for every N they hold the largest expected accepted
   count any N nodes of any one drafter could: the selection is never worse, by its own estimates,
   than the best single drafter's nodes;
3. **learns** (``update``): P(v) is the product down the path of each node's conditional
   acceptance (``Calibrator``), learned from what the verifier accepted: per drafter, depth and
   confidence bin (the drafter's own score, e.g. a draft probability or a suffix count ratio),
   refined by the node's rank among its siblings (model drafters) and by the length of the matched
   context (lookups: the natural predictor of a lookup's acceptance). A node that several drafters
   proposed is estimated apart, per set of drafters, since agreement says more than either alone;
   so a lookup's nodes are valued by what they were worth where no other drafter proposed them.

**Drafting time.** Each drafter's ``propose`` is timed every step it runs (a running estimate per
drafter). It is charged where the choice to spend it is made, before the drafter runs: against
what the drafter adds beyond the drafters run before it. A node several drafters propose is thus
credited to the cheapest of them (which runs first and would have proposed it anyway); a costly
drafter earns its time only with accepted tokens the cheaper ones had not proposed. Once drafters
have run, their time is spent: it changes no choice of N.

Selection only drops candidates, which keeps every verification rule exact: greedy verification
accepts the verifier's own argmax path through whatever tree it is given, and the tree rejection
rule is exact for any deterministic tree and for any prefix of a sampled chain. Sampled candidate
sets (with ``draft_probs``) are never merged: one drafter's set is kept whole or cut to a prefix.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .candidates import Candidates

# Upper edges of the confidence bins a drafter's score falls into (the last bin is (0.9, 1]).
SCORE_EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)
# Bins of a lookup's matched context length: 1, 2, 3, 4-5, 6-8, 9-15, 16+ tokens.
MATCH_EDGES = (1, 2, 3, 5, 8, 15)
RANK_BINS = 3  # a node's rank among its siblings: first, second, third or later
# Buckets of what the drafters run before another already offer this step (expected accepted tokens).
OFFER_EDGES = (0.05, 0.3, 0.7, 1.5, 2.5)
MAX_DEPTH_KEY = 6  # depths beyond this share one estimate
PRIOR_STRENGTH = 3.0  # pseudo-observations behind a prior
PRIOR_NO_SCORE = 0.3  # a drafter without confidence scores (n-gram lookup) before any evidence
DECAY = 0.97  # per observation of a key: old evidence fades over a few dozen observations
CHEAP_FRACTION = 0.05  # a drafter taking under this share of a one-token forward runs among the first


class Origin(NamedTuple):
    """One drafter's claim on a node of the merged tree."""

    source: int  # the drafter (a hybrid's part index)
    depth: int  # 1 = a child of the pending token
    score: float | None  # the drafter's own confidence (Candidates.scores), None if it has none
    rank: int = 0  # among its siblings in that drafter's tree, by score (0 = its first choice)
    match: int | None = None  # the matched context length behind a lookup's proposal


def _bin(score: float | None) -> int:
    return -1 if score is None else bisect.bisect_left(SCORE_EDGES, score)


def _bin_center(b: int) -> float:
    lo = 0.0 if b == 0 else SCORE_EDGES[b - 1]
    hi = 1.0 if b == len(SCORE_EDGES) else SCORE_EDGES[b]
    return (lo + hi) / 2


def _depth(d: int) -> int:
    return min(d, MAX_DEPTH_KEY)


class Calibrator:
    """P(a node is accepted | its parent was), learned from what the verifier accepted.

    Each estimate is a decayed Beta estimate ``(prior * m + hits) / (m + tries)``, hits and tries
    decayed by ``DECAY`` per observation, so it follows a drafter whose accuracy changes with the
    text (a prompt that turns repetitive) while one outlier moves it little. A node is estimated:

    * alone (one drafter proposed it): per (drafter, depth, confidence bin, rank among its
      siblings, lookup match length bin). Its prior is the bin's confidence (a drafter whose
      scores are calibrated needs no evidence at all) or ``prior_no_score``; for a model
      drafter's node, the estimate of its (drafter, depth, confidence bin) from the *other* ranks,
      with that prior (leaving the node's own cell out counts no evidence twice);
    * proposed by several drafters: per (set of drafters, depth, bin of the best of their own
      estimates), whose prior is that best estimate. Solo estimates learn only from solo nodes.
    """

    def __init__(self, prior_no_score: float = PRIOR_NO_SCORE):
        self.prior_no_score = prior_no_score
        self.stats: dict[tuple, list[float]] = {}  # key -> [hits, tries]
        self._coarse: dict[tuple, list[float]] = {}  # (drafter, depth, bin) -> sums over its fine cells
        self._memo: dict[tuple, dict[tuple, float]] = {}  # coarse key -> fine key -> origin_estimate, until it is observed

    @staticmethod
    def _beta(hits: float, tries: float, prior: float) -> float:
        return (prior * PRIOR_STRENGTH + hits) / (PRIOR_STRENGTH + tries)

    def _add(self, key: tuple, hit: bool) -> None:
        s = self.stats.setdefault(key, [0.0, 0.0])
        before = tuple(s)
        s[0] = s[0] * DECAY + float(hit)
        s[1] = s[1] * DECAY + 1.0
        if key[0] == "f":  # keep the coarse sums equal to the sums of their cells
            self._memo.pop(key[1:4], None)
            c = self._coarse.setdefault(key[1:4], [0.0, 0.0])
            c[0] += s[0] - before[0]
            c[1] += s[1] - before[1]

    def _prior(self, score: float | None) -> float:
        b = _bin(score)
        return self.prior_no_score if b < 0 else _bin_center(b)

    @staticmethod
    def _fine_key(o: Origin) -> tuple:
        match = -1 if o.match is None else bisect.bisect_left(MATCH_EDGES, o.match)
        return "f", o.source, _depth(o.depth), _bin(o.score), min(o.rank, RANK_BINS - 1), match

    def estimate(self, source: int, depth: int, score: float | None) -> float:
        """What a lone node of this drafter, depth and confidence is worth, whatever its rank or match."""
        hits, tries = self._coarse.get((source, _depth(depth), _bin(score)), (0.0, 0.0))
        return self._beta(hits, tries, self._prior(score))

    def origin_estimate(self, o: Origin) -> float:
        """What a node that only ``o.source`` proposed is worth."""
        key = self._fine_key(o)
        memo = self._memo.setdefault(key[1:4], {})
        p = memo.get(key)
        if p is None:
            hits, tries = self.stats.get(key, (0.0, 0.0))
            prior = self._prior(o.score)
            if o.match is None:  # ranks share what they have in common
                all_hits, all_tries = self._coarse.get(key[1:4], (0.0, 0.0))
                prior = self._beta(max(0.0, all_hits - hits), max(0.0, all_tries - tries), prior)
            # A lookup's match lengths do not: a long match is another thing than the short ones
            # (which may all fail), and it would never be verified to show it.
            p = memo[key] = self._beta(hits, tries, prior)
        return p

    def _combined(self, origins: list[Origin]) -> tuple[tuple | None, Origin, float]:
        """(combination key, or None for one drafter's node; its best origin; the prior) of a node."""
        estimates = [self.origin_estimate(o) for o in origins]
        prior = max(estimates)
        best = origins[estimates.index(prior)]
        sources = tuple(sorted({o.source for o in origins}))
        if len(sources) == 1:  # one drafter (a repeated sibling token): its best claim
            return None, best, prior
        return ("x", sources, _depth(best.depth), _bin(prior)), best, prior

    def node(self, origins: list[Origin]) -> float:
        """P(accepted | parent accepted) of a node with these origins."""
        if len(origins) == 1:
            return self.origin_estimate(origins[0])
        key, _, prior = self._combined(origins)
        return prior if key is None else self._beta(*self.stats.get(key, (0.0, 0.0)), prior)

    def mean(self, source: int, depth: int, default: float = 0.5) -> float:
        """The acceptance rate of every node of this drafter tried at this depth, alone or not."""
        return self._beta(*self.stats.get(("m", source, _depth(depth)), (0.0, 0.0)), default)

    def keys(self, origins: list[Origin]) -> list[tuple]:
        """The keys an observation of a node with these origins updates."""
        keys = [("m", s, _depth(origins[0].depth)) for s in sorted({o.source for o in origins})]
        combo, best, _ = self._combined(origins)
        return keys + [combo if combo is not None else self._fine_key(best)]

    def observe(self, observations: list[tuple[list[Origin], bool]]) -> None:
        """What the verifier did with the tried nodes of one step: (origins, accepted) each. The keys
        are read before any is updated, so a step's order of nodes changes nothing."""
        updates = [(self.keys(origins), hit) for origins, hit in observations]
        for keys, hit in updates:
            for key in keys:
                self._add(key, hit)

    def update(self, source: int, depth: int, score: float | None, hit: bool) -> None:
        """One observation of a node that only ``source`` proposed."""
        self.observe([([Origin(source, depth, score)], hit)])


@dataclass
class Selection:
    """What a step verifies and what the controller needs to learn from it."""

    candidates: Candidates
    origins: list[list[Origin]]  # node -> the claims of each drafter that proposed it
    probs: list[float]  # node -> estimated P(path accepted)
    sources_run: list[int]  # the drafters that ran this step, in the order they ran
    draft_s: dict[int, float] = field(default_factory=dict)
    proposed: dict[int, int] = field(default_factory=dict)  # drafter -> nodes it proposed
    buckets: dict[int, int] = field(default_factory=dict)  # drafter -> the bucket of what the drafters before it offered
    ages: dict[int, int] = field(default_factory=dict)  # drafter -> steps its observation stands for

    @property
    def expected_accepted(self) -> float:
        return sum(self.probs)


class _Ema:
    def __init__(self, decay: float, value: float | None = None):
        self.decay, self.value = decay, value

    def add(self, x: float, steps: int = 1) -> None:
        """One observation standing for ``steps`` steps (a drafter tried after skips: the estimate
        aged while nothing was observed, so the fresh one weighs more)."""
        keep = self.decay ** max(1, steps)
        self.value = x if self.value is None else keep * self.value + (1 - keep) * x

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@dataclass
class _Bucket:
    """What one drafter added, when it ran, after earlier drafters offered this bucket's worth."""

    gain: _Ema = field(default_factory=lambda: _Ema(0.93))  # accepted tokens it added
    nodes: _Ema = field(default_factory=lambda: _Ema(0.93))  # verified nodes it added
    skipped: int = 0  # skips in this bucket since it last ran in it
    probe_every: int = 4  # skips between tries while it does not pay here


@dataclass
class _SourceState:
    """Running evidence on one drafter."""

    draft_s: _Ema = field(default_factory=lambda: _Ema(0.8))  # seconds per propose
    recent_s: deque = field(default_factory=lambda: deque(maxlen=9))  # the last proposes' seconds (their median orders the drafters)
    level_s: _Ema = field(default_factory=lambda: _Ema(0.8))  # seconds per drafted level
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    quiet: int = 0  # steps it proposed in without one of its nodes verified
    probe_every: int = 4  # quiet steps before one of its nodes is verified whatever it scores


@dataclass
class _Offer:
    """The best selection from some proposals: expected accepted tokens and nodes."""

    gain: float
    nodes: int


@dataclass
class _Step:
    proposals: list[tuple[int, Candidates]] = field(default_factory=list)
    draft_s: dict[int, float] = field(default_factory=dict)
    matches: dict[int, int | None] = field(default_factory=dict)
    sunk: float = 0.0  # drafting seconds spent so far this step
    offers: dict[int, _Offer] = field(default_factory=dict)  # number of proposals -> their best selection
    merged: "TreeMerge" = field(default_factory=lambda: TreeMerge())  # the deterministic proposals so far, merged
    buckets: dict[int, int] = field(default_factory=dict)  # drafter -> the bucket it was planned in
    ages: dict[int, int] = field(default_factory=dict)  # drafter -> steps since it last ran in that bucket


class GoodputController:
    """Plans, selects and learns for one generation (see the module docstring).

    ``cost``: the verifier's cost curve, ``cost(q) -> ms`` with ``cost.observe(q, seconds)``.
    ``num_sources``: how many drafters propose (a hybrid's parts, or one).
    ``max_nodes``: the largest tree verified in one forward.

    Each step: ``begin()``; for each drafter ``i`` in ``order()``, if ``should_run(i)``, run it and
    ``add(i, candidates, seconds, levels, match)``; then ``select()``, verify, ``update()``.
    ``select(proposals, draft_s)`` does the whole step's planning part at once, for drafters that
    all ran.
    """

    PROBE_MAX = 16  # at most this many skips between tries: a try costs about a draft and one node
    NEGLIGIBLE = 0.02  # expected tokens per step too few to act on
    GOODPUT_DECAY = 0.95  # per step: the running goodput follows the text over a few dozen steps

    def __init__(self, cost, num_sources: int, *, max_nodes: int = 64, calibrator: Calibrator | None = None,
                 priors: list[list[float] | None] | None = None):
        """``priors[source]``: the source's acceptance per depth before any evidence (e.g. what a
        trained drafter recorded on held-out text), read where a level's worth is estimated."""
        self.cost = cost
        self.priors = priors or [None] * num_sources
        self.max_nodes = max_nodes
        self.calibrator = calibrator or Calibrator()
        self.sources = [_SourceState() for _ in range(num_sources)]
        self.plain_steps = 0
        self.probing: set[int] = set()  # sources tried again this step: one of their nodes is verified whatever it scores
        self._step = _Step()
        # The goodput of this generation so far (tokens per second, seconds from the cost curve and
        # the drafting times): what a second is worth, against which every choice is made.
        self._tokens = _Ema(self.GOODPUT_DECAY)
        self._time = _Ema(self.GOODPUT_DECAY)
        # Verify forwards' seconds beyond the cost curve, chains (True) and trees (False) apart: a
        # tree's forward (4D mask, its accepted path moved in the cache) may cost more than a chain's
        # of as many tokens, which the curve, measured on chains, does not say.
        self._residual = {True: _Ema(0.9), False: _Ema(0.9)}

    @property
    def tree_extra(self) -> float:
        """Seconds a tree's verify forward has cost beyond a chain's of as many tokens (0 until both seen)."""
        chain, tree = self._residual[True].value, self._residual[False].value
        return 0.0 if chain is None or tree is None else max(0.0, tree - chain)

    @property
    def goodput(self) -> float:
        """Tokens per second of the recent steps; plain decoding's 1 / c(1) before any."""
        if self._time.value is None or self._time.value <= 0:
            return 1.0 / self._seconds(1)
        return self._tokens.value / self._time.value

    def _seconds(self, q: float) -> float:
        """c(q) in seconds, linear between token counts (an expected node count is fractional)."""
        q = max(1.0, q)
        lo = math.floor(q)
        c_lo = self.cost(lo) / 1e3
        return c_lo if q == lo else c_lo + (q - lo) * (self.cost(lo + 1) / 1e3 - c_lo)

    # -- 1. plan --------------------------------------------------------------------------------
    def begin(self) -> None:
        """A new step: nothing proposed yet."""
        self._step = _Step(offers={0: _Offer(0.0, 0)})
        self.probing = set()

    def _cheap(self, source: int) -> bool:
        """Whether a drafter takes under CHEAP_FRACTION of a one-token forward (the median of its last
        proposes: one slow propose, the machine busy elsewhere, does not make it costly)."""
        recent = self.sources[source].recent_s
        return not recent or statistics.median(recent) <= CHEAP_FRACTION * self._seconds(1)

    def order(self) -> list[int]:
        """The order in which drafters are considered: those that cost next to nothing (lookups, or
        any not timed yet) first, so that the costly ones are planned knowing what they offered."""
        return sorted(range(len(self.sources)), key=lambda i: (not self._cheap(i), i))

    def should_run(self, source: int) -> bool:
        """Whether ``source`` runs now, after the drafters ``add``-ed so far this step: yes when what
        it adds (learned in this bucket of their offer) is worth, at this generation's goodput, its
        drafting time and the verify time of the nodes it adds, to within NEGLIGIBLE tokens; or when
        it is due a try. (A lookup whose nodes the selection verifies only where they pay costs
        next to nothing and runs; one whose verified nodes keep failing is skipped like any other.)"""
        step, s = self._step, self.sources[source]
        offer = self._offer()
        b = bisect.bisect_right(OFFER_EDGES, offer.gain)
        step.buckets[source] = b
        e = s.buckets.setdefault(b, _Bucket())
        if s.draft_s.value is None or e.gain.value is None:  # no evidence yet: try it
            run = True
        else:
            extra = s.draft_s.value + self._seconds(offer.nodes + e.nodes.value + 1) - self._seconds(offer.nodes + 1)
            run = e.gain.value + self.NEGLIGIBLE >= self.goodput * extra
            if run:
                e.probe_every = 4
            elif e.skipped + 1 >= e.probe_every:  # try again now and then: the text may have changed
                e.probe_every = min(self.PROBE_MAX, e.probe_every * 2)
                self.probing.add(source)
                run = True
        if run:
            step.ages[source] = e.skipped + 1
        e.skipped = 0 if run else e.skipped + 1
        if run and source not in self.probing and s.quiet + 1 >= s.probe_every:
            # It runs but its nodes, rated low, are never verified: without evidence a low
            # estimate would never be revised.
            s.probe_every = min(self.PROBE_MAX, s.probe_every * 2)
            self.probing.add(source)
        return run

    def add(self, source: int, cands: Candidates, seconds: float, levels: int = 0, match: int | None = None) -> None:
        """What ``source`` proposed this step, in ``seconds``, over ``levels`` drafted levels, from a
        matched context of ``match`` tokens (lookups)."""
        step, s = self._step, self.sources[source]
        step.proposals.append((source, cands))
        if len(cands) and cands.draft_probs is None:
            step.merged.add(source, cands, match)
        step.draft_s[source] = seconds
        step.matches[source] = match
        step.sunk += seconds
        s.draft_s.add(seconds)
        s.recent_s.append(seconds)
        if levels:
            s.level_s.add(seconds / levels)

    def _offer(self, upto: int | None = None) -> _Offer:
        """The best selection from the first ``upto`` proposals of this step (default: all so far),
        valued with the drafting time they took."""
        step = self._step
        n = len(step.proposals) if upto is None else upto
        if n not in step.offers:
            props = step.proposals[:n]
            spent = sum(step.draft_s[i] for i, _ in props)
            _, gain, nodes, _ = self._choose(props, step.matches, spent, step.merged if n == len(step.proposals) else None)
            step.offers[n] = _Offer(gain, nodes)
        return step.offers[n]

    def keep_going(self, source: int):
        """The ``DraftContext.keep_going`` callback for one source: ``(depth, paths) -> bool``
        where ``depth`` is the level about to be drafted and ``paths`` the raw confidence scores
        down to each frontier node. Yes while the frontier's expected accepted tokens outweigh what
        a level's drafting time is worth at this generation's goodput."""
        s = self.sources[source]

        def keep_going(depth: int, paths: list[list[float | None]]) -> bool:
            level = s.level_s.value
            if level is None:
                return True
            reach = 0.0
            for path in paths:
                p = 1.0
                for d, score in enumerate(path, 1):
                    p *= self.calibrator.estimate(source, d, score)
                reach += p
            prior = self.priors[source]
            default = prior[min(depth, len(prior)) - 1] if prior else 0.5
            gained = min(1.0, reach) * self.calibrator.mean(source, depth, default)
            return gained > self.goodput * level

        return keep_going

    # -- 2. select ------------------------------------------------------------------------------
    def select(self, proposals: list[tuple[int, Candidates]] | None = None, draft_s: dict[int, float] | None = None,
               levels: dict[int, int] | None = None, matches: dict[int, int | None] | None = None) -> Selection:
        """The best subtree of this step's merged proposals for goodput. Given ``proposals``
        (``(source, candidates)`` pairs, in the order they ran), with their ``draft_s``, ``levels``
        and lookup ``matches``, they are this step's proposals (the drafters all ran)."""
        if proposals is not None:
            self.begin()
            for i, c in proposals:
                self.add(i, c, (draft_s or {}).get(i, 0.0), (levels or {}).get(i, 0), (matches or {}).get(i))
        step = self._step
        run = [i for i, _ in step.proposals]
        if not run:
            self.plain_steps += 1
        _, gain, nodes, build = self._choose(step.proposals, step.matches, step.sunk, step.merged)
        step.offers[len(run)] = _Offer(gain, nodes)
        sel = build()
        sel.sources_run, sel.draft_s = run, dict(step.draft_s)
        sel.proposed = {i: len(c) for i, c in step.proposals}
        # The bucket of what the drafters before each one offered, for update to file what it added.
        sel.buckets = {i: step.buckets.get(i, bisect.bisect_right(OFFER_EDGES, self._offer(pos).gain)) for pos, i in enumerate(run)}
        sel.ages = dict(step.ages)
        return sel

    def _choose(self, proposals: list[tuple[int, Candidates]], matches: dict, spent: float, merged: TreeMerge | None = None):
        """(value, expected accepted tokens, node count, build() -> Selection) of the best
        selection from ``proposals`` after ``spent`` seconds of drafting (``merged``: their
        deterministic trees already merged)."""
        proposals = [(i, c) for i, c in proposals if len(c)]
        if not proposals:
            return 1.0 - self.goodput * (spent + self._seconds(1)), 0.0, 0, lambda: Selection(Candidates.empty(), [], [], [])
        if any(c.draft_probs is not None for _, c in proposals) and len(proposals) > 1:
            # Sampled sets cannot be merged: keep the one set that promises the most per second.
            return max((self._best(*merge([(i, c)], matches), spent) for i, c in proposals), key=lambda b: b[0])
        if merged is not None and all(c.draft_probs is None for _, c in proposals):
            return self._best(*merged.result(), spent)
        return self._best(*merge(proposals, matches), spent)

    def _node_probs(self, cands: Candidates, origins: list[list[Origin]]) -> list[float]:
        parents = cands.parents.tolist()
        cond = [self.calibrator.node(o) for o in origins]
        # Siblings are exclusive (one child at most is accepted): their estimates may not sum past 1.
        total: dict[int, float] = {}
        for p, c in zip(parents, cond):
            total[p] = total.get(p, 0.0) + c
        probs: list[float] = []
        for p, c in zip(parents, cond):
            c = c / total[p] if total[p] > 1.0 else c
            probs.append(c if p < 0 else probs[p] * c)
        return probs

    def _best(self, cands: Candidates, origins: list[list[Origin]], spent: float):
        probs = self._node_probs(cands, origins)
        # Highest P first; a child never above its parent and ties go to the earlier node, so every
        # prefix of this order is a tree.
        order = sorted(range(len(probs)), key=lambda v: (-probs[v], v))[: self.max_nodes]
        worth = self.goodput  # tokens a second is worth
        best_n, best_value, best_gain, gained = 0, 1.0 - worth * (spent + self._seconds(1)), 0.0, 0.0
        parents = cands.parents.tolist()
        tree_extra, chain = self.tree_extra, True
        for n, v in enumerate(order, 1):
            gained += probs[v]
            # The first n nodes are a chain while each hangs under the one before.
            chain = chain and parents[v] == (order[n - 2] if n > 1 else -1)
            value = 1.0 + gained - worth * (spent + self.cost(n + 1) / 1e3 + (0.0 if chain else tree_extra))
            if value > best_value:
                best_n, best_value, best_gain = n, value, gained

        def build() -> Selection:
            keep = order[:best_n]
            # A probe verifies at least its source's best root child: without evidence a low
            # estimate would never be revised.
            for src in self.probing:
                if not any(src in {o.source for o in origins[v]} for v in keep):
                    first = [v for v in order if cands.parents[v] < 0 and src in {o.source for o in origins[v]}]
                    keep = keep + first[:1]
            keep = sorted(keep)
            return Selection(subtree(cands, keep), [origins[v] for v in keep], [probs[v] for v in keep], [])

        return best_value, best_gain, best_n, build

    # -- 3. learn -------------------------------------------------------------------------------
    def update(self, sel: Selection, path: list[int], verify_s: float) -> None:
        """What the verifier accepted (``path``: node indices of ``sel.candidates``) and what the
        verify forward took."""
        q = len(sel.candidates) + 1
        chain = sel.candidates.is_chain
        self._residual[chain].add(verify_s - self._seconds(q))
        self.cost.observe(q, verify_s)
        self._tokens.add(1.0 + len(path))
        self._time.add(sum(sel.draft_s.values()) + self._seconds(q) + (0.0 if chain else self.tree_extra))
        on_path = set(path)
        parents = sel.candidates.parents.tolist()
        # Tried: a node whose parent was accepted.
        self.calibrator.observe([(origin, v in on_path) for v, origin in enumerate(sel.origins)
                                 if parents[v] < 0 or parents[v] in on_path])
        sources = [{o.source for o in origin} for origin in sel.origins]
        for pos, i in enumerate(sel.sources_run):
            st = self.sources[i]
            # What it added beyond the drafters run before it: the accepted path's nodes and the
            # verified nodes that they had not proposed (a node they proposed too is theirs).
            earlier = set(sel.sources_run[:pos])
            mine = [bool(src & earlier) or i in src for src in sources]
            theirs = [bool(src & earlier) for src in sources]
            gain = _prefix(path, mine) - _prefix(path, theirs)
            e = st.buckets.setdefault(sel.buckets.get(i, 0), _Bucket())
            age = sel.ages.get(i, 1)
            e.gain.add(float(gain), age)
            e.nodes.add(float(sum(mine) - sum(theirs)), age)
            if any(i in src for src in sources):
                st.quiet = 0
                if i not in self.probing:
                    st.probe_every = 4
            elif sel.proposed.get(i):
                st.quiet += 1


def _prefix(path: list[int], ok: list[bool]) -> int:
    """How far along the accepted path every node is ``ok``."""
    n = 0
    for v in path:
        if not ok[v]:
            break
        n += 1
    return n


def _ranks(cands: Candidates) -> list[int]:
    """Each node's rank among its siblings by the drafter's score (its order where it has none)."""
    scores = cands.scores.tolist() if cands.scores is not None else None
    children: dict[int, list[int]] = {}
    for v, p in enumerate(cands.parents.tolist()):
        children.setdefault(p, []).append(v)
    ranks = [0] * len(cands)
    for kids in children.values():
        if scores is not None:
            kids = sorted(kids, key=lambda v: (-scores[v], v))
        for r, v in enumerate(kids):
            ranks[v] = r
    return ranks


class TreeMerge:
    """Deterministic trees merged one by one into one tree: a node is (its parent, its token), so a
    token two drafters propose under the same path is one node carrying both origins."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.origins: list[list[Origin]] = []
        self._depth: list[int] = []
        self._index: dict[tuple[int, int], int] = {}
        self._built: tuple[Candidates, list[list[Origin]]] | None = None

    def add(self, source: int, cands: Candidates, match: int | None = None) -> None:
        """``match``: the matched context length behind a lookup's proposal."""
        self._built = None
        mapped: list[int] = []
        scores = cands.scores.tolist() if cands.scores is not None else [None] * len(cands)
        for tok, par, sc, rank in zip(cands.tokens.tolist(), cands.parents.tolist(), scores, _ranks(cands)):
            p = -1 if par < 0 else mapped[par]
            node = self._index.get((p, tok))
            if node is None:
                node = len(self.tokens)
                self._index[(p, tok)] = node
                self.tokens.append(tok)
                self.parents.append(p)
                self._depth.append(1 if p < 0 else self._depth[p] + 1)
                self.origins.append([])
            self.origins[node].append(Origin(source, self._depth[node], sc, rank, match))
            mapped.append(node)

    def result(self) -> tuple[Candidates, list[list[Origin]]]:
        if self._built is None:
            cands = Candidates(torch.tensor(self.tokens, dtype=torch.long), torch.tensor(self.parents, dtype=torch.long))
            self._built = cands, [list(o) for o in self.origins]
        return self._built


def merge(proposals: list[tuple[int, Candidates]], matches: dict[int, int | None] | None = None
          ) -> tuple[Candidates, list[list[Origin]]]:
    """One tree from several drafters' deterministic trees (``TreeMerge``), or a lone sampled set as
    drawn. ``matches[source]``: the matched context length behind a lookup's proposal."""
    matches = matches or {}
    if len(proposals) == 1 and proposals[0][1].draft_probs is not None:
        # A sampled set stays as drawn (repeated sibling tokens included: each row of draft_probs
        # belongs to one draw).
        source, cands = proposals[0]
        scores = cands.scores.tolist() if cands.scores is not None else [None] * len(cands)
        depths: list[int] = []
        for p in cands.parents.tolist():
            depths.append(1 if p < 0 else depths[p] + 1)
        return cands, [[Origin(source, d, sc, r, matches.get(source))] for d, sc, r in zip(depths, scores, _ranks(cands))]
    merged = TreeMerge()
    for source, cands in proposals:
        merged.add(source, cands, matches.get(source))
    return merged.result()


def subtree(cands: Candidates, keep: list[int]) -> Candidates:
    """The nodes ``keep`` (ascending, parent-closed) of ``cands``, re-indexed."""
    if len(keep) == len(cands):
        return cands
    new_index = {old: new for new, old in enumerate(keep)}
    parents = [-1 if p < 0 else new_index[p] for p in cands.parents[keep].tolist()] if keep else []
    idx = torch.tensor(keep, dtype=torch.long)
    probs = None if cands.draft_probs is None else cands.draft_probs[idx.to(cands.draft_probs.device)]
    scores = None if cands.scores is None else cands.scores[idx]
    return Candidates(cands.tokens[idx.to(cands.tokens.device)], torch.tensor(parents, dtype=torch.long), probs, scores)
