"""Speculative decoding: candidates (drafter -> engine contract), verification rules, the engine loop, metrics."""

from .candidates import Candidates
from .engine import GenerationOutput, SpeculativeDecoder
from .metrics import DecodingStats

__all__ = ["Candidates", "DecodingStats", "GenerationOutput", "SpeculativeDecoder"]
