"""Prompt lookup / n-gram drafting (training-free; Saxena 2023, vLLM's ``ngram`` method).

If the last n tokens occurred earlier in the context, propose the tokens that followed that
occurrence. Longer n-grams are tried first; among matches the most recent wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..decoding.candidates import Candidates
from ..errors import SpecHeadsError
from .base import DraftContext


@dataclass
class NgramMatch:
    """What the last proposal came from (read by goodput control: a longer match is accepted more often)."""

    match_length: int  # how far the context matched before the proposal: the n-gram, extended back (at most MATCH_REPORTED)


MATCH_REPORTED = 32


def _extension(tokens: np.ndarray, start: int, n: int) -> int:
    """How many tokens before the n-gram at ``start`` also match those before the context's last n."""
    end, m = tokens.size - n, 0
    while n + m < MATCH_REPORTED and start - 1 - m >= 0 and tokens[start - 1 - m] == tokens[end - 1 - m]:
        m += 1
    return m


class NgramDrafter:
    name = "ngram"
    needs_hidden_states = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise SpecHeadsError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.last: NgramMatch | None = None

    def start(self, prompt_ids: list[int]) -> None:
        pass

    def propose(self, ctx: DraftContext) -> Candidates:
        self.last = None
        k = ctx.num_draft_tokens
        tokens = np.asarray(ctx.tokens, dtype=np.int64)
        n_tokens = tokens.size
        if k <= 0:
            return Candidates.empty()
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            pattern = tokens[-n:]
            # Windows starting at 0 .. n_tokens-n-1: exclude the suffix matching itself.
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == pattern).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                self.last = NgramMatch(n + _extension(tokens, int(hits[-1]), n))
                return Candidates.chain(tokens[start : start + k].tolist())
        return Candidates.empty()

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        pass
