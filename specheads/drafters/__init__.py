"""Drafters and the name -> builder registry.

``build_drafter(spec, verifier)`` resolves what a user typed: a registered training-free name
(``ngram``, ``suffix``), ``suffix:FILE`` (the suffix drafter over a corpus index built by
``specheads suffix-index``), ``none`` for plain decoding, a specheads drafter checkpoint (its kind
read from the ``specheads`` block of its ``config.json``), or a plain model directory used as a
draft model.
Later drafter kinds register a checkpoint loader here; the engine never branches on kind.
"""

from __future__ import annotations

import os
from typing import Callable

from safetensors import SafetensorError

from ..errors import SpecHeadsError
from .base import DraftContext, Drafter
from .draft_model import DraftModelDrafter
from .ngram import NgramDrafter
from .suffix import SuffixDrafter, load_suffix_drafter

# name -> builder(verifier, **options) for drafters that need no checkpoint
BUILDERS: dict[str, Callable[..., Drafter]] = {
    "ngram": lambda verifier, **opts: NgramDrafter(**opts),
    "suffix": lambda verifier, **opts: SuffixDrafter(**opts),
}
SUFFIX_FILE = "suffix:"  # --drafter suffix:FILE
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

    _check_draft_model_folder(path)
    ids = top_tokens(path, draft_vocab, verifier.vocab_size) if draft_vocab else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=verifier.dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        ).to(verifier.device)
    except SpecHeadsError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # the folder passed the checks above, yet transformers refuses it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpecHeadsError(f"draft model {path} cannot be loaded: {first}") from exc
    return DraftModelDrafter(model, verifier.vocab_size, model_name=f"draft model {path}", draft_vocab=ids)


def _check_draft_model_folder(path: str) -> None:
    """What transformers would report as an OSError, a ValueError or a safetensors exception."""
    from safetensors import safe_open

    from ..checkpoint import read_json_config

    config = read_json_config(path)
    if not isinstance(config.get("model_type"), str):
        raise SpecHeadsError(
            f"{os.path.join(path, 'config.json')} has no model_type (got {config.get('model_type')!r}): neither a specheads "
            "drafter checkpoint (no 'specheads.drafter_kind') nor a Hugging Face model folder"
        )
    weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not weights:
        others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise SpecHeadsError(
            f"draft model {path} has no .safetensors weights" + (f", only {', '.join(others)}" if others else "")
            + ": specheads never unpickles .bin files; convert with model.save_pretrained(folder, safe_serialization=True)"
        )
    for name in weights:  # a header check: safetensors' own exception names neither file nor folder
        try:
            with safe_open(os.path.join(path, name), framework="pt"):
                pass
        except Exception as exc:
            raise SpecHeadsError(f"draft model weights {os.path.join(path, name)} are not valid safetensors: {exc}") from exc


from .medusa import load_medusa_drafter  # noqa: E402  (needs register_checkpoint_kind defined)

register_checkpoint_kind("medusa")(load_medusa_drafter)
from .eagle3 import load_eagle3_drafter  # noqa: E402

register_checkpoint_kind("eagle3")(load_eagle3_drafter)


@register_checkpoint_kind("draft_model")
def load_trained_draft_model(path: str, verifier, **options) -> DraftModelDrafter:
    """A distilled draft model (a model directory with a specheads block): refused for a verifier
    other than the one it was trained for, then loaded like any draft model."""
    from ..checkpoint import check_verifier, read_config

    check_verifier(read_config(path)["specheads"].get("verifier"), verifier, path)
    return load_draft_model(path, verifier, **options)


def build_drafter(spec: str | None, verifier, **options) -> Drafter | None:
    from ..checkpoint import read_json_config, recover_directory

    if spec in (None, "none", "plain"):
        return None
    if isinstance(spec, str) and "+" in spec:  # a hybrid: A+B+..., each part built as if alone
        from .hybrid import build_hybrid

        return build_hybrid(spec, lambda n, **opts: build_drafter(n, verifier, **opts), lambda n: _options_for(n, options),
                            set(BUILDERS), SUFFIX_FILE)
    if spec in BUILDERS:
        return BUILDERS[spec](verifier, **options)
    if isinstance(spec, str) and spec.startswith(SUFFIX_FILE):
        return load_suffix_drafter(spec[len(SUFFIX_FILE):], verifier, **options)
    recover_directory(spec)  # a save killed between its renames leaves the previous folder aside
    if not os.path.exists(spec):
        raise SpecHeadsError(
            f"unknown drafter '{spec}': not one of {', '.join(['none', *BUILDERS, SUFFIX_FILE + 'FILE'])} and no such file or directory"
        )
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise SpecHeadsError(f"drafter directory {spec} has no config.json")
    config = read_json_config(spec)  # refuses a non-object config or 'specheads' block
    if "specheads" not in config:
        return load_draft_model(spec, verifier, **options)
    # A specheads block means a checkpoint of a known kind: never guess it is a plain draft model.
    kind = config["specheads"].get("drafter_kind")
    if not isinstance(kind, str) or kind not in CHECKPOINT_LOADERS:
        raise SpecHeadsError(
            f"drafter checkpoint {spec} has unknown kind {kind!r} in 'specheads.drafter_kind' "
            f"(known: {', '.join(CHECKPOINT_LOADERS) or 'none'})"
        )
    return CHECKPOINT_LOADERS[kind](spec, verifier, **options)


def _options_for(spec: str, options: dict) -> dict:
    """The options a hybrid's part takes: a lookup drafter takes only its own (n-gram sizes)."""
    if spec in BUILDERS or spec.startswith(SUFFIX_FILE):
        return {k: v for k, v in options.items() if k in ("max_ngram", "min_ngram")} if spec == "ngram" else {}
    return {k: v for k, v in options.items() if k not in ("max_ngram", "min_ngram")}


__all__ = ["BUILDERS", "CHECKPOINT_LOADERS", "DraftContext", "DraftModelDrafter", "Drafter", "NgramDrafter", "SuffixDrafter", "build_drafter", "register_checkpoint_kind"]
