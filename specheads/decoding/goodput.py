"""Goodput control: each step, verify the candidates that are worth what they cost.

A verify step that keeps a set S of candidate nodes emits on average ``1 + sum_{v in S} P(v)``
tokens, where P(v) is the probability that the verifier accepts the whole path to v, and it costs
``draft + c(|S| + 1)`` seconds, c being the verifier's forward cost for q tokens (measured on this
machine and refined from every step). Their ratio is the step's goodput. Each step the controller

1. **plans** which drafters run (``plan``): one whose recent drafts have not paid for its own time
   is skipped, and tried again after a growing number of steps; with none running the step is a
   plain one. A drafter that drafts level by level asks ``DraftContext.keep_going`` before each
   level, which says yes while the level's expected tokens are worth its measured time;
2. **selects** (``select``): the drafters' trees are merged into one (a node proposed by two
   drafters is one node), P(v) is estimated for every node, and the N nodes with the highest P are
   kept, N (0 = a plain step) maximising ``(1 + sum P) / (draft + c(N + 1))``. A child never scores
   above its parent, so the kept nodes form a tree;
3. **learns** (``update``): P(v) is the product down the path of each node's conditional
   acceptance, estimated per (drafter, depth, confidence bin) from what the verifier accepted before
   (``Calibrator``), starting from the drafter's own confidence (``Candidates.scores``).

Selection only drops candidates, which keeps every verification rule exact: greedy verification
accepts the verifier's own argmax path through whatever tree it is given, and the tree rejection
rule is exact for any deterministic tree and for any prefix of a sampled chain. Sampled candidate
sets (with ``draft_probs``) are never merged: one drafter's set is kept whole or cut to a prefix.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .candidates import Candidates

# Upper edges of the confidence bins a drafter's score falls into (the last bin is (0.9, 1]).
SCORE_EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)
MAX_DEPTH_KEY = 6  # depths beyond this share one estimate
PRIOR_STRENGTH = 3.0  # pseudo-observations behind a prior
PRIOR_NO_SCORE = 0.3  # a drafter without confidence scores (n-gram lookup) before any evidence
DECAY = 0.97  # per observation of a key: old evidence fades over a few dozen observations


def _bin(score: float | None) -> int:
    return -1 if score is None else bisect.bisect_left(SCORE_EDGES, score)


def _bin_center(b: int) -> float:
    lo = 0.0 if b == 0 else SCORE_EDGES[b - 1]
    hi = 1.0 if b == len(SCORE_EDGES) else SCORE_EDGES[b]
    return (lo + hi) / 2


class Calibrator:
    """P(a node is accepted | its parent was), per (source, depth, confidence bin).

    A decayed Beta estimate: ``(prior * m + hits) / (m + tries)``, hits and tries decayed by
    ``DECAY`` per observation, so the estimate follows a drafter whose accuracy changes with the
    text (a prompt that turns repetitive) while one outlier moves it little. The prior is the bin's
    own confidence: a drafter whose scores are calibrated needs no evidence at all."""

    def __init__(self, prior_no_score: float = PRIOR_NO_SCORE):
        self.prior_no_score = prior_no_score
        self.stats: dict[tuple, list[float]] = {}  # key -> [hits, tries]

    @staticmethod
    def key(source: int, depth: int, score: float | None) -> tuple:
        return source, min(depth, MAX_DEPTH_KEY), _bin(score)

    def estimate(self, source: int, depth: int, score: float | None) -> float:
        k = self.key(source, depth, score)
        prior = self.prior_no_score if k[2] < 0 else _bin_center(k[2])
        hits, tries = self.stats.get(k, (0.0, 0.0))
        return (prior * PRIOR_STRENGTH + hits) / (PRIOR_STRENGTH + tries)

    def mean(self, source: int, depth: int, default: float = 0.5) -> float:
        """The acceptance rate of every node tried at this depth, whatever its confidence."""
        depth = min(depth, MAX_DEPTH_KEY)
        hits = tries = 0.0
        for (s, d, _), (h, t) in self.stats.items():
            if s == source and d == depth:
                hits, tries = hits + h, tries + t
        return (default * PRIOR_STRENGTH + hits) / (PRIOR_STRENGTH + tries)

    def update(self, source: int, depth: int, score: float | None, hit: bool) -> None:
        s = self.stats.setdefault(self.key(source, depth, score), [0.0, 0.0])
        s[0] = s[0] * DECAY + float(hit)
        s[1] = s[1] * DECAY + 1.0


@dataclass
class Selection:
    """What a step verifies and what the controller needs to learn from it."""

    candidates: Candidates
    origins: list[list[tuple[int, int, float | None]]]  # node -> (source, depth, score) of each drafter that proposed it
    probs: list[float]  # node -> estimated P(path accepted)
    sources_run: list[int]  # the drafters that ran this step
    draft_s: dict[int, float] = field(default_factory=dict)

    @property
    def expected_accepted(self) -> float:
        return sum(self.probs)


class _Ema:
    def __init__(self, decay: float, value: float | None = None):
        self.decay, self.value = decay, value

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@dataclass
class _SourceState:
    """Running evidence on whether one drafter pays for itself."""

    draft_s: _Ema = field(default_factory=lambda: _Ema(0.8))  # seconds per propose
    level_s: _Ema = field(default_factory=lambda: _Ema(0.8))  # seconds per drafted level
    with_tokens: _Ema = field(default_factory=lambda: _Ema(0.85))  # accepted drafts when it ran
    without_tokens: _Ema = field(default_factory=lambda: _Ema(0.85))  # what the others alone would have got
    with_nodes: _Ema = field(default_factory=lambda: _Ema(0.85))
    without_nodes: _Ema = field(default_factory=lambda: _Ema(0.85))
    skipped: int = 0  # steps since it last ran
    probe_every: int = 4  # steps between tries while it does not pay


class GoodputController:
    """Plans, selects and learns for one generation (see the module docstring).

    ``cost``: the verifier's cost curve, ``cost(q) -> ms`` with ``cost.observe(q, seconds)``.
    ``num_sources``: how many drafters propose (a hybrid's parts, or one).
    ``max_nodes``: the largest tree verified in one forward.
    """

    PROBE_MAX = 16  # at most this many steps between tries: a try costs about a draft and one node
    NEGLIGIBLE = 0.02  # a relative goodput difference too small to act on

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
        self.probing: set[int] = set()

    # -- 1. plan --------------------------------------------------------------------------------
    def _seconds(self, q: int) -> float:
        return self.cost(q) / 1e3

    def _rate(self, tokens: float, nodes: float, draft_s: float) -> float:
        return (1.0 + tokens) / (draft_s + self._seconds(max(1, round(nodes) + 1)))

    def plan(self) -> list[int]:
        """The sources to run this step (empty: a plain step)."""
        run = []
        self.probing: set[int] = set()  # sources tried again this step: one of their nodes is verified whatever it scores
        for i, s in enumerate(self.sources):
            if s.with_tokens.value is None:  # no evidence yet: try it
                run.append(i)
                continue
            others = sum(o.draft_s.get(0.0) for j, o in enumerate(self.sources) if j != i)
            # Within NEGLIGIBLE of breaking even it runs: a drafter that costs next to nothing (a
            # lookup) may propose rarely, and skipping it saves nothing measurable.
            pays = (self._rate(s.with_tokens.get(0.0), s.with_nodes.get(0.0), others + s.draft_s.get(0.0))
                    >= (1 - self.NEGLIGIBLE) * self._rate(s.without_tokens.get(0.0), s.without_nodes.get(0.0), others))
            if pays:
                s.probe_every = 4
                run.append(i)
            elif s.skipped + 1 >= s.probe_every:  # try again now and then: the text may have changed
                s.probe_every = min(self.PROBE_MAX, s.probe_every * 2)
                run.append(i)
                self.probing.add(i)
        for i, s in enumerate(self.sources):
            s.skipped = 0 if i in run else s.skipped + 1
        if not run:
            self.plain_steps += 1
        return run

    def keep_going(self, source: int):
        """The ``DraftContext.keep_going`` callback for one source: ``(depth, paths) -> bool``
        where ``depth`` is the level about to be drafted and ``paths`` the raw confidence scores
        down to each frontier node. Yes while the frontier's expected accepted tokens times the
        value of a token (this step's expected time per token) outweigh a level's drafting time."""
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
            tokens = 1.0 + s.with_tokens.get(1.0)
            per_token = (s.draft_s.get(0.0) + self._seconds(max(1, round(s.with_nodes.get(1.0)) + 1))) / tokens
            return gained * per_token > level

        return keep_going

    # -- 2. select ------------------------------------------------------------------------------
    def select(self, proposals: list[tuple[int, Candidates]], draft_s: dict[int, float], levels: dict[int, int] | None = None) -> Selection:
        """The best subtree of the merged proposals (``(source, candidates)`` pairs) for goodput."""
        for i, seconds in draft_s.items():
            st = self.sources[i]
            st.draft_s.add(seconds)
            if levels and levels.get(i):
                st.level_s.add(seconds / levels[i])
        spent = sum(draft_s.values())
        run = [i for i, _ in proposals]
        proposals = [(i, c) for i, c in proposals if len(c)]
        if not proposals:
            return Selection(Candidates.empty(), [], [], run, dict(draft_s))
        if any(c.draft_probs is not None for _, c in proposals) and len(proposals) > 1:
            # Sampled sets cannot be merged: keep the one set that promises the most per second.
            best = max((self._best(*_single(i, c), spent) for i, c in proposals), key=lambda b: b[0])
            sel = best[1]
        else:
            sel = self._best(*merge(proposals), spent)[1]
        sel.sources_run, sel.draft_s = run, dict(draft_s)
        return sel

    def _node_probs(self, cands: Candidates, origins) -> list[float]:
        parents = cands.parents.tolist()
        cond = [max(self.calibrator.estimate(s, d, sc) for s, d, sc in o) for o in origins]
        # Siblings are exclusive (one child at most is accepted): their estimates may not sum past 1.
        total: dict[int, float] = {}
        for p, c in zip(parents, cond):
            total[p] = total.get(p, 0.0) + c
        probs: list[float] = []
        for p, c in zip(parents, cond):
            c = c / total[p] if total[p] > 1.0 else c
            probs.append(c if p < 0 else probs[p] * c)
        return probs

    def _best(self, cands: Candidates, origins, spent: float) -> tuple[float, Selection]:
        probs = self._node_probs(cands, origins)
        # Highest P first; a child never above its parent and ties go to the earlier node, so every
        # prefix of this order is a tree.
        order = sorted(range(len(probs)), key=lambda v: (-probs[v], v))[: self.max_nodes]
        best_n, best_rate, gained = 0, self._rate(0.0, 0, spent), 0.0
        for n, v in enumerate(order, 1):
            gained += probs[v]
            rate = (1.0 + gained) / (spent + self._seconds(n + 1))
            if rate > best_rate:
                best_n, best_rate = n, rate
        keep = order[:best_n]
        # A probe verifies at least its source's best root child: without evidence a low estimate
        # would never be revised.
        for src in self.probing:
            if not any(src in {o[0] for o in origins[v]} for v in keep):
                first = [v for v in order if cands.parents[v] < 0 and src in {o[0] for o in origins[v]}]
                keep = keep + first[:1]
        keep = sorted(keep)
        sub = subtree(cands, keep)
        return best_rate, Selection(sub, [origins[v] for v in keep], [probs[v] for v in keep], [])

    # -- 3. learn -------------------------------------------------------------------------------
    def update(self, sel: Selection, path: list[int], verify_s: float) -> None:
        """What the verifier accepted (``path``: node indices of ``sel.candidates``) and what the
        verify forward took."""
        q = len(sel.candidates) + 1
        self.cost.observe(q, verify_s)
        on_path = set(path)
        parents = sel.candidates.parents.tolist()
        for v, origin in enumerate(sel.origins):
            if parents[v] < 0 or parents[v] in on_path:  # tried: its parent was accepted
                for s, d, score in origin:
                    self.calibrator.update(s, d, score, v in on_path)
        for i in sel.sources_run:
            st = self.sources[i]
            others = [any(s != i for s, _, _ in o) for o in sel.origins]
            # Without this drafter the others' nodes would have been verified: the accepted path
            # up to the first node only it proposed is what they would have got.
            without = 0
            for v in path:
                if not others[v]:
                    break
                without += 1
            st.with_tokens.add(float(len(path)))
            st.without_tokens.add(float(without))
            st.with_nodes.add(float(len(parents)))
            st.without_nodes.add(float(sum(others)))


def merge(proposals: list[tuple[int, Candidates]]) -> tuple[Candidates, list[list[tuple[int, int, float | None]]]]:
    """One tree from several drafters' deterministic trees: a node is (its parent, its token), so a
    token two drafters propose under the same path is one node carrying both origins."""
    tokens: list[int] = []
    parents: list[int] = []
    origins: list[list[tuple[int, int, float | None]]] = []
    depth: list[int] = []
    index: dict[tuple[int, int], int] = {}
    if len(proposals) == 1 and proposals[0][1].draft_probs is not None:
        # A sampled set stays as drawn (repeated sibling tokens included: each row of draft_probs
        # belongs to one draw).
        source, cands = proposals[0]
        scores = cands.scores.tolist() if cands.scores is not None else [None] * len(cands)
        depths = []
        for p in cands.parents.tolist():
            depths.append(1 if p < 0 else depths[p] + 1)
        return cands, [[(source, d, sc)] for d, sc in zip(depths, scores)]
    for source, cands in proposals:
        mapped: list[int] = []
        scores = cands.scores.tolist() if cands.scores is not None else [None] * len(cands)
        for tok, par, sc in zip(cands.tokens.tolist(), cands.parents.tolist(), scores):
            p = -1 if par < 0 else mapped[par]
            node = index.get((p, tok))
            if node is None:
                node = len(tokens)
                index[(p, tok)] = node
                tokens.append(tok)
                parents.append(p)
                depth.append(1 if p < 0 else depth[p] + 1)
                origins.append([])
            origins[node].append((source, depth[node], sc))
            mapped.append(node)
    return Candidates(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)), origins


def _single(source: int, cands: Candidates):
    return merge([(source, cands)])


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
