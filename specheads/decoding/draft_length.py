"""How many tokens to draft each step: fixed, or chosen from measured acceptance and cost.

The adaptive rule models each drafted token as accepted with probability alpha (estimated from
recent steps), so a draft of k tokens emits E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens per
verify step, and it measures what a step costs: the verifier forward over k+1 tokens plus k
draft tokens. It picks the k with the most tokens per second; k = 0 is plain decoding, so when
drafts are poor it falls back to plain decoding (and probes again now and then).
"""

from __future__ import annotations

from ..errors import SpecHeadsError


class FixedDraftLength:
    def __init__(self, k: int):
        if k < 0:
            raise SpecHeadsError(f"num_draft_tokens must be >= 0, got {k}")
        self.k = k

    def choose(self) -> int:
        return self.k

    def update(self, k: int, num_drafted: int, num_accepted: int, verify_s: float, draft_s: float) -> None:
        pass


class AdaptiveDraftLength:
    def __init__(self, max_k: int, decay: float = 0.9, probe_every: int = 16):
        if max_k < 1:
            raise SpecHeadsError(f"adaptive drafting needs num_draft_tokens >= 1 as its maximum, got {max_k}")
        self.max_k, self.decay, self.probe_every = max_k, decay, probe_every
        self.accepted = 1.0  # decayed sums with a weak prior of alpha = 0.5
        self.rejected = 1.0
        self.verify_s: dict[int, float] = {}  # query length -> EMA seconds per verifier forward
        self.draft_s_per_token: float | None = None
        self.steps_since_draft = 0
        self.k = max_k  # start optimistic: the first steps measure what drafting gives

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def _verify_cost(self, q: int) -> float:
        if q in self.verify_s:
            return self.verify_s[q]
        known = sorted(self.verify_s)
        if not known:
            return 1.0 + 0.1 * (q - 1)
        lower = [x for x in known if x < q]
        upper = [x for x in known if x > q]
        if lower and upper:  # interpolate
            a, b = lower[-1], upper[0]
            return self.verify_s[a] + (self.verify_s[b] - self.verify_s[a]) * (q - a) / (b - a)
        if lower:  # extrapolate upward with a conservative slope: never assume extra tokens are free
            a = lower[-1]
            return self.verify_s[a] * (1 + 0.1 * (q - a))
        return self.verify_s[upper[0]]

    def choose(self) -> int:
        return self.k

    def update(self, k: int, num_drafted: int, num_accepted: int, verify_s: float, draft_s: float) -> None:
        q = num_drafted + 1
        prev = self.verify_s.get(q)
        self.verify_s[q] = verify_s if prev is None else self.decay * prev + (1 - self.decay) * verify_s
        if num_drafted:
            per_token = draft_s / num_drafted
            d = self.draft_s_per_token
            self.draft_s_per_token = per_token if d is None else self.decay * d + (1 - self.decay) * per_token
            self.accepted = self.decay * self.accepted + num_accepted
            self.rejected = self.decay * self.rejected + (1 if num_accepted < num_drafted else 0)
            self.steps_since_draft = 0
        else:
            self.steps_since_draft += 1
        self.k = self._best_k()

    def _best_k(self) -> int:
        if self.steps_since_draft >= self.probe_every:
            return 1  # refresh the acceptance estimate after a stretch of plain decoding
        alpha = min(self.alpha, 0.999)
        draft = self.draft_s_per_token or 0.0
        best_k, best_rate = 0, 1.0 / self._verify_cost(1)
        for k in range(1, self.max_k + 1):
            expected = (1 - alpha ** (k + 1)) / (1 - alpha)
            rate = expected / (self._verify_cost(k + 1) + k * draft)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
