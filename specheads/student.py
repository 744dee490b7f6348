"""Draft models (students) for a verifier, sharing its vocabulary exactly. Three starts:

* cut from the verifier: its embeddings, final norm and LM head plus a subset of its decoder
  layers, so the student starts close to the verifier (``cut_layers``);
* any causal LM, a local directory or a hub id, whose vocabulary is the verifier's
  (``load_student_model``; a hub id is checked when it loads, from the hub or its cache);
* a fresh random model of the verifier's architecture family with a smaller shape, the
  verifier's embeddings copied in when the hidden sizes match (``student_from_config``).

``build_student`` picks one from a recipe's ``drafter.student`` section.

    python -m specheads.student smollm2-135m runs/students/smollm2-every6 --layers every:6
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re

import torch

from .atomic_files import atomic_directory
from .errors import SpecHeadsError

_LAYER_SPEC = re.compile(r"every:(\d+)|first:(\d+)|\d+(\s*,\s*\d+)*")


def layer_spec_ok(spec) -> bool:
    """Whether ``spec`` is well formed (every:M / first:L with M, L >= 1, or indices), before
    the verifier's depth is known."""
    if isinstance(spec, (list, tuple)):
        return bool(spec) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec)
    if not isinstance(spec, str) or not (m := _LAYER_SPEC.fullmatch(spec.strip())):
        return False
    return not (m.group(1) or m.group(2)) or int(m.group(1) or m.group(2)) >= 1


def parse_layers(spec, num_layers: int) -> list[int]:
    """'every:M' (layers 0, M, 2M, ...), 'first:L', explicit '0,3,7', or a list of indices."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(i) for i in spec)
    if m := re.fullmatch(r"every:(\d+)", spec):
        step = int(m.group(1))
        if step < 1:
            raise SpecHeadsError(f"layer spec '{spec}': the step must be >= 1")
        layers = list(range(0, num_layers, step))
    elif m := re.fullmatch(r"first:(\d+)", spec):
        layers = list(range(int(m.group(1))))
    else:
        try:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise SpecHeadsError(f"layer spec '{spec}' is not every:M, first:L or a comma list of indices") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise SpecHeadsError(f"layer indices {bad or layers} out of range for a verifier with {num_layers} layers")
    return layers


def cut_layers(model, layers: list[int]):
    """A new causal LM with the given decoder layers of ``model`` (Llama-style ``model.layers``)."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise SpecHeadsError(f"cannot cut layers from {type(model).__name__}: it has no model.layers")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(model)(config)
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in layers:
            state[f"model.layers.{layers.index(int(m.group(1)))}.{m.group(2)}"] = value
    student.load_state_dict(state, strict=True)
    return student.to(next(model.parameters()).dtype).eval()


def _vocab_error(what: str, size: int, verifier) -> SpecHeadsError:
    return SpecHeadsError(
        f"{what} has vocabulary size {size} but the verifier '{verifier.name}' has {verifier.vocab_size}: "
        "a draft model must share the verifier's tokenizer and vocabulary"
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path) -> bool:
    """Whether ``path`` reads as a hub model id ("org/name") rather than a local path: no such file
    or folder here, no leading ".", "/" or "~", one slash."""
    return (isinstance(path, str) and _HUB_ID.fullmatch(path) is not None and not path.startswith((".", "~"))
            and not os.path.exists(path))


def _unreachable(path: str, exc: Exception) -> SpecHeadsError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return SpecHeadsError(f"student model '{path}' (drafter.student.path) cannot be reached: it is not a local model "
                          f"directory, and the hub (or its cache) cannot give it ({first})")


def _config_vocab_size(path: str, *, trust_remote_code: bool = False, local: bool | None = None) -> int | None:
    """The vocabulary size a model's config declares: a local folder's config.json, or a hub id's
    config (the hub or its cache; the weights are not fetched)."""
    if is_hub_id(path):
        from transformers import AutoConfig

        if local is None:
            local = _hub_cache_only(path)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise _unreachable(path, exc) from exc
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "vocab_size", None)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    text = config.get("text_config") or config
    return text.get("vocab_size")


def _hub_cache_only(path: str) -> bool:
    """True when the hub is out of reach and its cache holds ``path``; out of reach and not cached:
    one clear error at once (transformers alone retries every file for minutes)."""
    from .verifier import hub_cache_only

    return hub_cache_only(path, what="student model", key="drafter.student.path")


def load_student_model(path: str, verifier, *, trust_remote_code: bool = False):
    """A causal LM (local directory or hub id) as a student, refused unless its vocabulary is the verifier's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = is_hub_id(path)
    if not hub and not os.path.isfile(os.path.join(path, "config.json")):
        raise SpecHeadsError(f"student model {path} is not a model directory (no config.json) nor a hub id (org/name)")
    local = _hub_cache_only(path) if hub else False
    declared = _config_vocab_size(path, trust_remote_code=trust_remote_code, local=local)
    if declared is not None and declared != verifier.vocab_size:  # refuse before loading any weights
        raise _vocab_error(f"student model {path}", declared, verifier)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                     local_files_only=local)
    except OSError as exc:
        if not hub:
            raise
        raise _unreachable(path, exc) from exc
    actual = model.get_output_embeddings().weight.shape[0]
    if actual != verifier.vocab_size:
        raise _vocab_error(f"student model {path}", actual, verifier)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # no tokenizer beside the weights: the vocabulary size is all we can check
    if tokenizer is not None and verifier.tokenizer is not None and tokenizer.get_vocab() != verifier.tokenizer.get_vocab():
        raise SpecHeadsError(f"student model {path} has {actual} tokens like the verifier '{verifier.name}', but a different tokenizer (token -> id maps differ)")
    return model.eval()


def student_from_config(model, *, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int | None = None,
                        copy_embeddings: bool = True, seed: int = 0):
    """A fresh, randomly initialised model of ``model``'s class and vocabulary with a smaller shape."""
    config = copy.deepcopy(model.config)
    old_hidden, old_heads = config.hidden_size, config.num_attention_heads
    config.hidden_size, config.num_hidden_layers, config.num_attention_heads = hidden_size, num_layers, num_heads
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden_size // num_heads
    kv = getattr(config, "num_key_value_heads", None)
    if kv:  # keep the verifier's grouped-query ratio where it divides
        group = max(1, old_heads // kv)
        config.num_key_value_heads = num_heads // group if num_heads % group == 0 else num_heads
    if getattr(config, "intermediate_size", None) is not None:
        config.intermediate_size = intermediate_size or max(1, round(config.intermediate_size * hidden_size / old_hidden))
    elif hasattr(config, "n_inner"):  # GPT-2 family: None means 4 x hidden
        config.n_inner = intermediate_size
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(num_layers)]
    with torch.random.fork_rng():  # a seeded init that leaves the caller's random state alone
        torch.manual_seed(seed)
        student = type(model)(config)
    if copy_embeddings and hidden_size == old_hidden:
        with torch.no_grad():
            student.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
            out, src = student.get_output_embeddings(), model.get_output_embeddings()
            if out is not None and out.weight is not student.get_input_embeddings().weight:
                out.weight.copy_(src.weight)
    return student.to(next(model.parameters()).dtype).eval()


def check_student(section, verifier) -> None:
    """The checks that need the verifier but no student weights: run before data and training."""
    if section.source == "verifier_layers":
        try:
            parse_layers(section.layers, verifier.config.num_hidden_layers)
        except SpecHeadsError as exc:
            raise SpecHeadsError(f"recipe value drafter.student.layers={section.layers!r}: {exc}") from None
    elif section.source == "model":
        declared = _config_vocab_size(section.path)  # a hub id that cannot be reached fails here, before any data
        if declared is not None and declared != verifier.vocab_size:
            raise _vocab_error(f"student model {section.path} (drafter.student.path)", declared, verifier)


def build_student(section, verifier, *, seed: int = 0, trust_remote_code: bool = False):
    """The student a recipe's ``drafter.student`` section asks for, in float32 (trained weights)."""
    check_student(section, verifier)
    if section.source == "verifier_layers":
        student = cut_layers(verifier.model, parse_layers(section.layers, verifier.config.num_hidden_layers))
    elif section.source == "model":
        student = load_student_model(section.path, verifier, trust_remote_code=trust_remote_code)
    elif section.source == "config":
        student = student_from_config(
            verifier.model, hidden_size=section.hidden_size, num_layers=section.num_layers, num_heads=section.num_heads,
            intermediate_size=section.intermediate_size, copy_embeddings=section.copy_embeddings, seed=seed,
        )
    else:
        raise SpecHeadsError(f"recipe value drafter.student.source={section.source!r} is not verifier_layers, model or config")
    return student.to(torch.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m specheads.student", description="Cut a draft model from the verifier's own layers.")
    p.add_argument("verifier")
    p.add_argument("output_dir")
    p.add_argument("--layers", default="every:6", help="every:M, first:L or 0,3,7 (default: %(default)s)")
    args = p.parse_args(argv)
    from .verifier import load_verifier

    v = load_verifier(args.verifier)
    layers = parse_layers(args.layers, v.config.num_hidden_layers)
    student = cut_layers(v.model, layers)

    def write(tmp):
        student.save_pretrained(tmp, safe_serialization=True)
        if v.tokenizer is not None:
            v.tokenizer.save_pretrained(tmp)

    atomic_directory(args.output_dir, write)
    n = sum(p.numel() for p in student.parameters())
    print(f"draft model with layers {layers} ({n / 1e6:.1f}M parameters): {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
