"""From logits to the distribution a token is drawn from, with Hugging Face's own warpers.

The verifier's distribution is exactly what ``generate(do_sample=True)`` samples from: logits
warped by temperature, top-k and top-p, in that order, then softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import SpecHeadsError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        # Stored as Python numbers of one type: transformers' temperature warper refuses an int
        # (SamplingParams(temperature=1) is 1.0 here), and NaN fails every comparison below
        # silently, so it is refused by name, as is inf (a temperature of inf is not a distribution).
        object.__setattr__(self, "temperature", _real("temperature", self.temperature))
        object.__setattr__(self, "top_p", _real("top_p", self.top_p))
        if isinstance(self.top_k, bool) or not hasattr(self.top_k, "__index__"):
            raise SpecHeadsError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.temperature < 0:
            raise SpecHeadsError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SpecHeadsError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SpecHeadsError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            procs.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(self.top_p))
        return procs

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V] logits -> [n, V] float32 probabilities (one-hot on the argmax when greedy)."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        # The warpers ignore input_ids; they take [batch, V] scores.
        return torch.softmax(self.warpers()(None, logits), dim=-1)


def _real(name: str, value) -> float:
    """A finite float from an int, float or numpy/torch scalar (not a bool or a string)."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise SpecHeadsError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SpecHeadsError(f"{name} must be a finite number, got {value}")
    return value


def draw(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None = None) -> tuple[int, torch.Tensor | None]:
    """A drafted token from [V] logits: the argmax when greedy (q None: one-hot), else a sample and
    the distribution q it was drawn from, which the rejection rule must be given."""
    if sampling.greedy:
        return int(logits.argmax()), None
    q = sampling.probs(logits[None])[0]
    return int(torch.multinomial(q, 1, generator=generator)), q
