"""The typed contract between a drafter and the engine.

Candidates form a tree over the verifier's pending token (the root, which the engine already
holds and which has no entry here). Node i holds ``tokens[i]``; ``parents[i]`` is the index of
its parent node, or -1 for a child of the root. A chain of k drafted tokens is the one-branch
tree ``parents = [-1, 0, 1, ..., k-2]``. Nodes are topologically ordered (parent before child).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SpecHeadsError
from .sampling import SamplingParams


@dataclass
class Candidates:
    tokens: torch.Tensor  # [n] long: drafted token ids
    parents: torch.Tensor  # [n] long: parent node index, -1 = the pending token
    # [n, V] float: the drafter's probability q(. | path) at each node, from which tokens[i] was
    # sampled. None means a deterministic drafter (q is one-hot on tokens[i]).
    draft_probs: torch.Tensor | None = None
    # [n] float in [0, 1]: the drafter's own confidence that node i is accepted given its parent
    # was (e.g. its draft probability of tokens[i], or a match frequency). Never used to verify;
    # the engine's goodput control calibrates it against what the verifier accepts. None: unknown.
    scores: torch.Tensor | None = None

    @classmethod
    def chain(cls, tokens, draft_probs: torch.Tensor | None = None, scores=None) -> "Candidates":
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        parents = torch.arange(-1, tokens.numel() - 1, dtype=torch.long)
        scores = None if scores is None else torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        return cls(tokens=tokens, parents=parents, draft_probs=draft_probs, scores=scores)

    @classmethod
    def empty(cls) -> "Candidates":
        return cls.chain([])

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def is_chain(self) -> bool:
        n = len(self)
        return bool(torch.equal(self.parents.cpu(), torch.arange(-1, n - 1)))

    def __post_init__(self):
        # SpecHeadsError: a drafter's bad proposal would otherwise surface as an index error deep
        # in tree attention or in verification.
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 1:
            raise SpecHeadsError(f"tokens {tuple(self.tokens.shape)} and parents {tuple(self.parents.shape)} must be equal 1-D shapes")
        if len(self) and bool((self.parents < -1).any()):
            bad = [p for p in self.parents.tolist() if p < -1]
            raise SpecHeadsError(f"parents must be -1 (the pending token) or a node index, got {bad[0]} in {self.parents.tolist()}")
        if len(self) and bool((self.parents >= torch.arange(len(self), device=self.parents.device)).any()):
            raise SpecHeadsError(f"parents must point to earlier nodes (topological order): {self.parents.tolist()}")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self):
            raise SpecHeadsError(f"draft_probs has {self.draft_probs.shape[0]} rows for {len(self)} candidate tokens")
        if self.scores is not None and tuple(self.scores.shape) != (len(self),):
            raise SpecHeadsError(f"scores has shape {tuple(self.scores.shape)} for {len(self)} candidate tokens")


@dataclass
class DraftContext:
    # Every token so far (prompt + generated). The last one is the *pending* token: emitted by the
    # verifier but not yet run through it, so it is the root of the next candidate tree.
    tokens: list[int]
    num_draft_tokens: int  # how many tokens to draft this step (a chain of this length, or tree depth)
    sampling: SamplingParams
    generator: torch.Generator | None = None
    # For drafters with needs_hidden_states: the verifier's hidden states (one tensor per layer,
    # embeddings first, as transformers returns them), each [m, H] for the m tokens the last
    # forward accepted (after the prefill: every prompt token), ending with the row that
    # predicted the pending token.
    hidden_states: tuple[torch.Tensor, ...] | None = None
    # For drafters that draft level by level (chains, dynamic trees): ask before each level after
    # the first, ``keep_going(depth, paths) -> bool``, with ``depth`` the level about to be drafted
    # and ``paths`` the drafter's confidence scores down to each node it would expand. None: draft
    # all ``num_draft_tokens`` levels (the engine's goodput control passes one).
    keep_going: Callable[[int, list[list[float | None]]], bool] | None = None
    levels_drafted: int = 0  # set by a level-by-level drafter: how many levels it ran (the engine times a level with it)
