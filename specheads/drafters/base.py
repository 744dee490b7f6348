"""The one interface every drafter implements.

The engine calls ``start`` once per prompt, then per verify step ``propose`` (candidate tokens
after the pending token) and ``observe`` (what the verifier accepted). Drafters keep their own
state (a draft model's KV cache, an n-gram index); the engine owns the verifier and its cache.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..decoding.candidates import Candidates, DraftContext

__all__ = ["Drafter", "DraftContext"]


@runtime_checkable
class Drafter(Protocol):
    name: str
    needs_hidden_states: bool

    def start(self, prompt_ids: list[int]) -> None:
        """Reset per-request state for a new prompt."""

    def propose(self, ctx: DraftContext) -> Candidates:
        """Candidate tokens to verify after ctx.tokens[-1] (may be empty)."""

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        """The last proposal's first ``num_accepted`` tokens were kept; ``emitted`` were appended."""
