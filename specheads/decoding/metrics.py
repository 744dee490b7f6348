"""Acceptance statistics of a decoding run, counted as the papers count them.

tau (mean accepted length) = tokens emitted per verify step, the verifier's own (recovered or
bonus) token included; plain decoding has tau = 1. The prefill forward, which emits the first
token, is not a verify step and is excluded from tau.
acceptance_per_position[i] = of the verify steps that drafted at least i+1 tokens, the fraction
in which draft token i+1 was accepted (so it is cumulative: position i needs all before it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PartStats:
    """One drafter of a hybrid: what it drafted, what of it was verified and accepted, its time.

    A node that several parts proposed counts for each of them, so the parts' ``accepted`` may sum
    to more than the accepted drafts; ``accepted_alone`` counts the accepted nodes no other part
    proposed."""

    name: str
    runs: int = 0  # verify steps it proposed in (goodput control may skip it)
    proposed: int = 0  # candidate nodes it proposed
    verified: int = 0  # of those, nodes verified
    accepted: int = 0  # of those, nodes the verifier accepted
    accepted_alone: int = 0  # accepted nodes that no other part proposed
    draft_s: float = 0.0  # time in its propose

    def add(self, other: "PartStats") -> None:
        for name in ("runs", "proposed", "verified", "accepted", "accepted_alone", "draft_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class DecodingStats:
    verify_steps: int = 0
    emitted_in_steps: int = 0
    drafted_at: list[int] = field(default_factory=list)  # [position] -> steps that drafted it
    accepted_at: list[int] = field(default_factory=list)  # [position] -> steps that accepted it
    new_tokens: int = 0
    nodes_verified: int = 0  # candidate nodes verified, over all steps
    plain_steps: int = 0  # verify steps with no candidate (goodput control chose none, or nothing was proposed)
    prefill_s: float = 0.0
    verify_s: float = 0.0  # time in verifier forwards of verify steps
    draft_s: float = 0.0  # time in the drafter
    total_s: float = 0.0
    parts: list[PartStats] = field(default_factory=list)  # a hybrid drafter's parts, in its order

    def observe_parts(self, names: list[str], proposed: dict[int, int], draft_s: dict[int, float],
                      origins: list[list[int]], path: list[int]) -> None:
        """One step of a hybrid: ``proposed[i]`` nodes and ``draft_s[i]`` seconds of each part that
        ran, ``origins[v]`` the parts that proposed verified node v, ``path`` the accepted nodes."""
        if not self.parts:
            self.parts = [PartStats(n) for n in names]
        for i, n in proposed.items():
            p = self.parts[i]
            p.runs += 1
            p.proposed += n
            p.draft_s += draft_s.get(i, 0.0)
        accepted = set(path)
        for v, sources in enumerate(origins):
            for i in set(sources):
                self.parts[i].verified += 1
                if v in accepted:
                    self.parts[i].accepted += 1
                    self.parts[i].accepted_alone += int(len(set(sources)) == 1)

    def observe_step(self, num_drafted: int, num_accepted: int, num_emitted: int, nodes: int | None = None) -> None:
        """``num_drafted``: the chain's length or the tree's depth; ``nodes``: the nodes verified (default: num_drafted)."""
        self.verify_steps += 1
        self.emitted_in_steps += num_emitted
        self.nodes_verified += num_drafted if nodes is None else nodes
        self.plain_steps += int(num_drafted == 0)
        while len(self.drafted_at) < num_drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(num_drafted):
            self.drafted_at[i] += 1
        for i in range(num_accepted):
            self.accepted_at[i] += 1

    def merge(self, other: "DecodingStats") -> None:
        self.verify_steps += other.verify_steps
        self.emitted_in_steps += other.emitted_in_steps
        for i in range(len(other.drafted_at)):
            if i >= len(self.drafted_at):
                self.drafted_at.append(0)
                self.accepted_at.append(0)
            self.drafted_at[i] += other.drafted_at[i]
            self.accepted_at[i] += other.accepted_at[i]
        for name in ("new_tokens", "nodes_verified", "plain_steps", "prefill_s", "verify_s", "draft_s", "total_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.parts:
            if not self.parts:
                self.parts = [PartStats(p.name) for p in other.parts]
            if [p.name for p in other.parts] != [p.name for p in self.parts]:
                raise ValueError(f"cannot add the stats of parts {[p.name for p in other.parts]} to those of {[p.name for p in self.parts]}")
            for mine, theirs in zip(self.parts, other.parts):
                mine.add(theirs)

    @property
    def tau(self) -> float:
        return self.emitted_in_steps / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_at, self.drafted_at) if d]

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens over all positions."""
        drafted = sum(self.drafted_at)
        return sum(self.accepted_at) / drafted if drafted else 0.0

    @property
    def mean_draft_length(self) -> float:
        return sum(self.drafted_at) / self.verify_steps if self.verify_steps else 0.0

    @property
    def mean_nodes(self) -> float:
        """Candidate nodes verified per step (plain steps count 0)."""
        return self.nodes_verified / self.verify_steps if self.verify_steps else 0.0

    def parts_report(self) -> list[dict]:
        """Per part of a hybrid: its counts, drafting ms per run, the share of the steps it ran in
        and ``accepted_share``, the share of all accepted draft tokens that it proposed (with
        ``accepted_alone_share``, those only it proposed)."""
        total = sum(self.accepted_at)
        out = []
        for p in self.parts:
            d = asdict(p)
            d["draft_ms_per_run"] = 1e3 * p.draft_s / p.runs if p.runs else 0.0
            d["run_fraction"] = p.runs / self.verify_steps if self.verify_steps else 0.0
            d["accepted_share"] = p.accepted / total if total else 0.0
            d["accepted_alone_share"] = p.accepted_alone / total if total else 0.0
            out.append(d)
        return out

    def to_dict(self) -> dict:
        extra = {"parts": self.parts_report()} if self.parts else {}
        return {
            "tau": self.tau,
            "acceptance_per_position": self.acceptance_per_position,
            "acceptance_rate": self.acceptance_rate,
            "mean_draft_length": self.mean_draft_length,
            "mean_nodes": self.mean_nodes,
            "plain_steps": self.plain_steps,
            "verify_steps": self.verify_steps,
            "new_tokens": self.new_tokens,
            "time_s": {"total": self.total_s, "prefill": self.prefill_s, "verify": self.verify_s, "draft": self.draft_s},
            **extra,
        }
