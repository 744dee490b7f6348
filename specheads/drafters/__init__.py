"""Drafters and the name -> builder registry.

``build_drafter(spec, verifier)`` resolves what a user typed: a registered training-free name
(``ngram``), ``none`` for plain decoding, a specheads drafter checkpoint (its kind read from the
``specheads`` block of its ``config.json``), or a plain model directory used as a draft model.
Later drafter kinds register a checkpoint loader here; the engine never branches on kind.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from ..errors import SpecHeadsError
from .base import DraftContext, Drafter
from .draft_model import DraftModelDrafter
from .ngram import NgramDrafter

# name -> builder(verifier, **options) for drafters that need no checkpoint
BUILDERS: dict[str, Callable[..., Drafter]] = {
    "ngram": lambda verifier, **opts: NgramDrafter(**opts),
}
# checkpoint kind -> loader(path, verifier, **options)
CHECKPOINT_LOADERS: dict[str, Callable[..., Drafter]] = {}


def register_checkpoint_kind(kind: str):
    def wrap(loader):
        CHECKPOINT_LOADERS[kind] = loader
        return loader

    return wrap


def load_draft_model(path: str, verifier, *, trust_remote_code: bool = False, draft_vocab: int = 0, **_) -> DraftModelDrafter:
    """A draft model directory; ``draft_vocab`` N > 0 scores only the N most frequent tokens of
    its training answers (its ``draft_vocab.json``)."""
    from transformers import AutoModelForCausalLM

    from ..draft_vocab import top_tokens

    ids = top_tokens(path, draft_vocab, verifier.vocab_size) if draft_vocab else None
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=verifier.dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(verifier.device)
    return DraftModelDrafter(model, verifier.vocab_size, model_name=f"draft model {path}", draft_vocab=ids)


from .medusa import load_medusa_drafter  # noqa: E402  (needs register_checkpoint_kind defined)

register_checkpoint_kind("medusa")(load_medusa_drafter)


@register_checkpoint_kind("draft_model")
def load_trained_draft_model(path: str, verifier, **options) -> DraftModelDrafter:
    """A distilled draft model (a model directory with a specheads block): refused for a verifier
    other than the one it was trained for, then loaded like any draft model."""
    from ..checkpoint import check_verifier, read_config

    check_verifier(read_config(path)["specheads"].get("verifier", {}), verifier, path)
    return load_draft_model(path, verifier, **options)


def build_drafter(spec: str | None, verifier, **options) -> Drafter | None:
    if spec in (None, "none", "plain"):
        return None
    if spec in BUILDERS:
        return BUILDERS[spec](verifier, **options)
    if not os.path.exists(spec):
        raise SpecHeadsError(
            f"unknown drafter '{spec}': not one of {', '.join(['none', *BUILDERS])} and no such file or directory"
        )
    config_path = os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise SpecHeadsError(f"drafter directory {spec} has no config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecHeadsError(f"drafter config {config_path} is not valid JSON: {exc}") from exc
    kind = (config.get("specheads") or {}).get("drafter_kind")
    if kind is None:
        return load_draft_model(spec, verifier, **options)
    if kind not in CHECKPOINT_LOADERS:
        raise SpecHeadsError(f"drafter checkpoint {spec} has unknown kind '{kind}' (known: {', '.join(CHECKPOINT_LOADERS) or 'none'})")
    return CHECKPOINT_LOADERS[kind](spec, verifier, **options)


__all__ = ["BUILDERS", "CHECKPOINT_LOADERS", "DraftContext", "DraftModelDrafter", "Drafter", "NgramDrafter", "build_drafter", "register_checkpoint_kind"]
