"""Several drafters at once: their candidate trees are merged into one and verified together.

A model drafter (EAGLE-3, Medusa, a draft model) is good at ordinary text; a lookup drafter
(n-gram prompt lookup, the suffix index) is good where the text repeats itself or earlier outputs,
and costs next to nothing. A ``HybridDrafter`` is the list of them: the engine asks each part to
propose, merges the proposals into one tree (a token two parts propose under the same path is one
node) and, under goodput control, verifies only the nodes worth their cost and runs a part only
while it pays for its own time (``decoding/goodput.py``). Named on the command line as
``A+B+...``, e.g. ``runs/smollm2-eagle3-quick/drafter+ngram``.
"""

from __future__ import annotations

from ..decoding.candidates import Candidates, DraftContext
from ..errors import SpecHeadsError


class HybridDrafter:
    name = "hybrid"
    proposes_trees = True  # merged proposals branch even when every part proposes a chain

    def __init__(self, parts: list):
        if len(parts) < 2:
            raise SpecHeadsError(f"a hybrid drafter needs at least two parts, got {len(parts)}")
        if any(isinstance(p, HybridDrafter) for p in parts):
            raise SpecHeadsError("a hybrid drafter's parts must be plain drafters, not hybrids")
        self.parts = list(parts)
        self.needs_hidden_states = any(p.needs_hidden_states for p in parts)

    @property
    def detail(self) -> str:
        return " + ".join(f"{p.name} ({p.detail})" if getattr(p, "detail", None) else p.name for p in self.parts)

    def fresh(self) -> "HybridDrafter":
        """The same parts, those that learn across requests (``fresh``) without their history."""
        return HybridDrafter([p.fresh() if hasattr(p, "fresh") else p for p in self.parts])

    def clear_history(self) -> None:
        for p in self.parts:
            if hasattr(p, "clear_history"):
                p.clear_history()

    # The engine drives the parts itself; these make a hybrid usable as a plain drafter too.
    def start(self, prompt_ids: list[int]) -> None:
        for p in self.parts:
            p.start(prompt_ids)

    def propose(self, ctx: DraftContext) -> Candidates:
        from ..decoding.goodput import merge

        if ctx.hidden_states is not None and any(getattr(p, "hidden_layers", None) for p in self.parts):
            raise SpecHeadsError("call the parts of a hybrid drafter through SpeculativeDecoder, which hands each its verifier layers")
        proposals = [(i, p.propose(ctx)) for i, p in enumerate(self.parts)]
        proposals = [(i, c) for i, c in proposals if len(c)]
        if not proposals:
            return Candidates.empty()
        if any(c.draft_probs is not None for _, c in proposals):
            raise SpecHeadsError("a hybrid drafter's parts sampled their drafts (draft_probs): sampled sets cannot be merged")
        return merge(proposals)[0]

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        for p in self.parts:
            p.observe(num_accepted, emitted)
