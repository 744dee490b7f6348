"""Several drafters at once: their candidate trees are merged into one and verified together.

A model drafter (EAGLE-3, Medusa, a draft model) is good at ordinary text; a lookup drafter
(n-gram prompt lookup, the suffix index) is good where the text repeats itself or earlier outputs,
and costs next to nothing. A ``HybridDrafter`` is the list of them. The engine drives the parts
itself under goodput control (``decoding/goodput.py``): each step the lookups propose first, a
costly part runs only when what it is expected to add beside them pays for its drafting time (a
long, confident suffix match leaves EAGLE-3 idle), the proposals are merged into one tree (a token
two parts propose under the same path is one node) and only the nodes worth their verify cost are
verified. Each part's acceptance is learned apart (per depth and rank for a model drafter, per
match length for a lookup), and the report counts per part what it proposed, what of it was
accepted and its drafting time (``DecodingStats.parts``). Named on the command line as
``A+B+...``, e.g. ``runs/smollm2-eagle3-quick/drafter+ngram+suffix``.
"""

from __future__ import annotations

import os

from ..decoding.candidates import Candidates, DraftContext
from ..errors import SpecHeadsError


class HybridDrafter:
    name = "hybrid"
    proposes_trees = True  # merged proposals branch even when every part proposes a chain

    def __init__(self, parts: list, labels: list[str] | None = None):
        """``labels``: how reports name the parts (default: their kinds, numbered where two share one)."""
        if len(parts) < 2:
            raise SpecHeadsError(f"a hybrid drafter needs at least two parts, got {len(parts)}")
        if any(isinstance(p, HybridDrafter) for p in parts):
            raise SpecHeadsError("a hybrid drafter's parts must be plain drafters, not hybrids")
        if labels is not None and len(labels) != len(parts):
            raise SpecHeadsError(f"a hybrid drafter of {len(parts)} parts got {len(labels)} labels")
        self.parts = list(parts)
        self.labels = list(labels) if labels is not None else _kind_labels(self.parts)
        self.needs_hidden_states = any(p.needs_hidden_states for p in parts)

    @property
    def detail(self) -> str:
        return " + ".join(f"{p.name} ({p.detail})" if getattr(p, "detail", None) else p.name for p in self.parts)

    def fresh(self) -> "HybridDrafter":
        """The same parts, those that learn across requests (``fresh``) without their history."""
        return HybridDrafter([p.fresh() if hasattr(p, "fresh") else p for p in self.parts], self.labels)

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


def _kind_labels(parts: list) -> list[str]:
    names = [p.name for p in parts]
    return [f"{n}#{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def build_hybrid(spec: str, build, part_options, lookups, suffix_file: str) -> HybridDrafter:
    """``--drafter A+B+...``: each part built by ``build(name, **part_options(name))`` as if alone;
    ``lookups`` are the names of the training-free drafters and ``suffix_file`` the prefix of a
    suffix index part (both from the registry, which imports this module).

    Refused, with one error naming the part: an empty or ``none`` part, a part named twice (the same
    lookup, or the same folder), and a part that cannot be built (an unknown name, a checkpoint of
    another verifier, a corrupt file): the other parts never run alone in its place."""
    names = [s.strip() for s in spec.split("+")]
    if not all(names) or any(n in ("none", "plain") for n in names):
        raise SpecHeadsError(f"hybrid drafter '{spec}': name two or more drafters joined by '+', e.g. runs/x/drafter+ngram "
                             "(paths may not contain '+')")
    seen: dict[str, str] = {}
    for n in names:  # a lookup by its name, a file or folder by where it really is
        if n in lookups:
            key = n
        elif n.startswith(suffix_file):
            key = suffix_file + os.path.realpath(n[len(suffix_file):])
        else:
            key = os.path.realpath(n)
        if key in seen:
            also = f" (as '{seen[key]}')" if seen[key] != n else ""
            raise SpecHeadsError(f"hybrid drafter '{spec}' names the part '{n}' twice{also}: a part drafts once per step, so a "
                                 "second copy would only add its drafting time")
        seen[key] = n
    parts = []
    for pos, n in enumerate(names, 1):
        try:
            parts.append(build(n, **part_options(n)))
        except SpecHeadsError as exc:
            raise SpecHeadsError(f"hybrid drafter '{spec}': part {pos} '{n}' cannot be used: {exc}") from exc
        if parts[-1] is None:
            raise SpecHeadsError(f"hybrid drafter '{spec}': part {pos} '{n}' is no drafter")
    return HybridDrafter(parts, _spec_labels(names, parts, lookups, suffix_file))


def _spec_labels(names: list[str], parts: list, lookups, suffix_file: str) -> list[str]:
    """Report names for the parts as typed: a lookup by its name, a checkpoint folder as
    kind:folder (a training run's ``drafter`` folder with its run's name), e.g.
    ``eagle3:smollm2-eagle3-full/drafter``; the whole path where two would read the same."""
    labels = []
    for n, p in zip(names, parts):
        if n in lookups or n.startswith(suffix_file):
            labels.append(n)
            continue
        folders = [f for f in os.path.normpath(n).split(os.sep) if f]
        tail = folders[-2:] if len(folders) > 1 and folders[-1] == "drafter" else folders[-1:]
        labels.append(f"{p.name}:{'/'.join(tail)}")
    return [n if labels.count(label) > 1 else label for n, label in zip(names, labels)]
