"""specheads: train speculative-decoding drafters for a verifier LLM and decode losslessly with them."""

from .decoding import Candidates, DecodingStats, GenerationOutput, SpeculativeDecoder
from .decoding.sampling import SamplingParams
from .drafters import build_drafter
from .errors import SpecHeadsError
from .verifier import Verifier, load_verifier

__version__ = "0.1.0"
__all__ = [
    "Candidates",
    "DecodingStats",
    "GenerationOutput",
    "SamplingParams",
    "SpecHeadsError",
    "SpeculativeDecoder",
    "Verifier",
    "build_drafter",
    "load_verifier",
]
