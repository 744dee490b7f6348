"""SuffixDecoding-style drafting (training-free; Oliaro et al., arXiv 2411.04975; vLLM's ``suffix``).

Find the longest suffix of the context (prompt + tokens so far) that occurred before, and propose
the continuations that followed it most often, as a candidate tree. Two sources, each with its own
longest match, as SuffixDecoding keeps a per-request tree beside its global one:

* the request: its own prompt and output so far (prompt lookup's case);
* the global index: every earlier request of this process (prompt and output), plus an optional
  corpus built offline (``specheads suffix-index``); their counts are summed.

Each source grows a tree best-first by path probability, the product of the conditional
frequencies count(path) / count(parent path) from the match down: at most
min(``max_nodes``, ``spec_factor`` × match length) nodes and min(``max_depth``, the engine's draft
length) levels, and no node whose path probability is below ``min_token_prob``. The tree with the
larger score (the sum of its path probabilities, i.e. the expected number of accepted tokens
under the counts) is proposed. Node scores are the conditional frequencies. The tree is
deterministic (no ``draft_probs``), which the engine's tree rules verify exactly at any temperature.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..decoding.candidates import Candidates
from ..errors import SpecHeadsError
from .base import DraftContext
from .suffix_index import SuffixArray, TokenBuffer

# The history's newest requests are scanned; past this many tokens they are indexed with the
# older ones (a rebuild costs about a second per million tokens, so it is kept rare).
HISTORY_SCAN_TOKENS = 32768


@dataclass
class SuffixMatch:
    """What the last proposal came from (for a hybrid's control and for tests)."""

    source: str  # "request" or "global"
    match_length: int
    score: float  # sum of the nodes' path probabilities


class SuffixDrafter:
    name = "suffix"
    needs_hidden_states = False
    proposes_trees = True

    def __init__(
        self,
        corpus: SuffixArray | None = None,
        *,
        max_depth: int = 8,
        max_nodes: int = 8,
        min_token_prob: float = 0.1,
        spec_factor: float = 1.0,
        max_match: int = 24,
        max_cached_requests: int = 10000,
    ):
        """``corpus``: an offline index (``SuffixArray.load``) or None. ``max_match``: the longest
        context suffix looked up. ``max_cached_requests``: earlier requests kept in the global
        index (0: none; beyond it the oldest are dropped at the history's next rebuild)."""
        for key, value in (("max_depth", max_depth), ("max_nodes", max_nodes), ("max_match", max_match)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecHeadsError(f"suffix drafter: {key} must be an integer >= 1, got {value!r}")
        if isinstance(max_cached_requests, bool) or not isinstance(max_cached_requests, int) or max_cached_requests < 0:
            raise SpecHeadsError(f"suffix drafter: max_cached_requests must be an integer >= 0, got {max_cached_requests!r}")
        if isinstance(min_token_prob, bool) or not isinstance(min_token_prob, (int, float)) or not 0 <= min_token_prob <= 1:
            raise SpecHeadsError(f"suffix drafter: min_token_prob must be between 0 and 1, got {min_token_prob!r}")
        if isinstance(spec_factor, bool) or not isinstance(spec_factor, (int, float)) or not spec_factor > 0:
            raise SpecHeadsError(f"suffix drafter: spec_factor must be > 0, got {spec_factor!r}")
        if corpus is not None and max_match + max_depth > corpus.sort_depth:
            raise SpecHeadsError(
                f"suffix drafter: max_match {max_match} + max_depth {max_depth} exceeds the depth {corpus.sort_depth} "
                f"its corpus index is sorted to; lower them or rebuild the index with --sort-depth {max_match + max_depth}"
            )
        self.corpus = corpus
        self.max_depth, self.max_nodes, self.max_match = max_depth, max_nodes, max_match
        self.min_token_prob, self.spec_factor = float(min_token_prob), float(spec_factor)
        self.max_cached_requests = max_cached_requests
        self.last: SuffixMatch | None = None
        self._request = TokenBuffer()
        self._synced = False  # the request buffer holds the verifier's first token (seen in propose)
        self._history: list[np.ndarray] = []  # committed requests, oldest first
        self._history_sa: SuffixArray | None = None  # all of them but those in _recent
        self._recent = TokenBuffer()
        self._hints: dict[int, tuple[int, int]] = {}  # id(part) -> (context size, match length) last step

    @property
    def detail(self) -> str:
        where = "request, earlier requests" + (
            f", corpus {os.path.basename(self.corpus.path or '') or 'in memory'} ({self.corpus.num_tokens} tokens)"
            if self.corpus is not None else "")
        return (f"trees of <= {self.max_nodes} nodes, {self.max_depth} levels, min_token_prob {self.min_token_prob:g}, "
                f"spec_factor {self.spec_factor:g}; from {where}")

    # -- protocol -----------------------------------------------------------------------------
    def start(self, prompt_ids: list[int]) -> None:
        self._commit()
        self._request.clear()
        self._request.extend(prompt_ids)
        self._synced = False
        self._hints.clear()

    def propose(self, ctx: DraftContext) -> Candidates:
        self.last = None
        depth = min(ctx.num_draft_tokens, self.max_depth)
        if depth <= 0 or not ctx.tokens:
            return Candidates.empty()
        self._sync(ctx.tokens)
        context = self._request.ranks()
        best = self._grow([self._request], context, depth, "request")
        glob = self._grow(self._global_parts(), context, depth, "global")
        if glob is not None and (best is None or glob[3].score > best[3].score):
            best = glob
        if best is None:
            return Candidates.empty()
        tokens, parents, scores, self.last = best
        return Candidates(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                          scores=torch.tensor(scores, dtype=torch.float32))

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        if self._synced:
            self._request.extend(emitted)

    # -- the request and the history ----------------------------------------------------------
    def _sync(self, tokens: list[int]) -> None:
        """Make the request buffer equal ``tokens`` (the engine's context), appending when it only
        grew, which is every step of the engine's loop."""
        n = self._request.size
        tail = min(n, 8)
        if n and len(tokens) >= n and (self._request.ranks()[n - tail :] - 1).tolist() == list(tokens[n - tail : n]):
            self._request.extend(tokens[n:])
        else:
            self._request.clear()
            self._request.extend(tokens)
            self._hints.clear()
        self._synced = True

    def _commit(self) -> None:
        """Move the finished request into the history (prompt and output as one sequence)."""
        if not self.max_cached_requests or self._request.size == 0:
            return
        seq = self._request.tokens().astype(np.int32)
        self._history.append(seq)
        self._recent.extend(seq)
        self._recent.end_sequence()
        if self._recent.size > HISTORY_SCAN_TOKENS:
            self._history = self._history[-self.max_cached_requests :]
            self._history_sa = SuffixArray.build(self._history, sort_depth=self.max_match + self.max_depth)
            self._recent.clear()

    def fresh(self) -> "SuffixDrafter":
        """A drafter with the same corpus and options and no earlier requests: a benchmark gives
        each method its own, so no method drafts a prompt from another method's run of it."""
        return SuffixDrafter(self.corpus, max_depth=self.max_depth, max_nodes=self.max_nodes, min_token_prob=self.min_token_prob,
                             spec_factor=self.spec_factor, max_match=self.max_match, max_cached_requests=self.max_cached_requests)

    def clear_history(self) -> None:
        """Forget the earlier requests (the corpus stays), e.g. after a benchmark's warm-up, whose
        outputs would otherwise draft the same prompts' timed runs."""
        self._history, self._history_sa = [], None
        self._recent.clear()
        self._request.clear()
        self._hints.clear()

    def _global_parts(self) -> list:
        parts = [p for p in (self.corpus, self._history_sa) if p is not None and p.sa.size]
        return parts + ([self._recent] if self._recent.size else [])

    # -- the tree -----------------------------------------------------------------------------
    def _grow(self, parts: list, context: np.ndarray, depth: int, source: str):
        """(tokens, parents, scores, SuffixMatch) of the tree grown from the longest suffix of
        ``context`` found in ``parts`` (counts summed over them), or None when none matches."""
        if not parts:
            return None
        found = []
        for part in parts:
            # The match grows by at most the tokens added since the last step (a suffix of an
            # occurring pattern occurs), so that bound is tried first.
            seen = self._hints.get(id(part))
            bound = self.max_match if seen is None else min(self.max_match, seen[1] + context.size - seen[0])
            length, state = part.longest_suffix(context, bound)
            self._hints[id(part)] = (context.size, length)
            found.append((length, part, state))
        length = max(f[0] for f in found)
        budget = min(self.max_nodes, int(self.spec_factor * length + 1e-9))
        if length == 0 or budget == 0:
            return None
        root = [(part, state) for n, part, state in found if n == length]  # the others lack this match
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        total = 0.0
        heap: list = []
        order = 0

        def push_children(states, prob: float, parent: int, level: int) -> None:
            nonlocal order
            for token, cond, child in self._children(states, prob):
                if prob * cond >= self.min_token_prob - 1e-12:  # 0.5 * 0.2 must pass 0.1
                    heapq.heappush(heap, (-prob * cond, order, token, cond, child, parent, level))
                    order += 1

        push_children(root, 1.0, -1, 1)
        while heap and len(tokens) < budget:
            neg, _, token, cond, child, parent, level = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            scores.append(cond)
            total -= neg
            if level < depth and len(tokens) < budget:
                push_children(child, -neg, len(tokens) - 1, level + 1)
        return (tokens, parents, scores, SuffixMatch(source, length, total)) if tokens else None

    def _children(self, states: list, prob: float) -> list[tuple[int, float, list]]:
        """(token, conditional frequency, child states) of the continuations of ``states`` that
        can reach path probability min_token_prob, most frequent first."""
        # A token with at least a fraction f of the summed counts has at least f of some part's.
        fraction = self.min_token_prob / prob if prob > 0 else 1.0
        if len(states) == 1:
            part, state = states[0]
            known, children = part.expand(state, fraction)
            return [(token, count / known, [(part, child)]) for token, count, child in children]
        expanded = [(part, *part.expand(state, fraction)) for part, state in states]
        known = sum(k for _, k, _ in expanded)
        if known == 0:
            return []
        found: dict[int, list] = {}
        for part, _, children in expanded:
            for token, _, _ in children:
                found.setdefault(token, [])
        for token, child_states in found.items():
            count = 0
            for (part, state), (_, _, children) in zip(states, expanded):
                hit = next(((c, s) for t, c, s in children if t == token), None)
                if hit is None:
                    hit = part.child(state, token)
                if hit[0]:
                    count += hit[0]
                    child_states.append((part, hit[1]))
            found[token] = (count, child_states)
        ranked = sorted(found.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return [(token, count / known, child) for token, (count, child) in ranked]


def load_suffix_drafter(path: str, verifier, **options) -> SuffixDrafter:
    """``--drafter suffix:FILE``: the drafter over the corpus index FILE, checked against ``verifier``."""
    return SuffixDrafter(SuffixArray.load(path, verifier), **options)
