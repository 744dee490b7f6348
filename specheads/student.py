"""Draft models cut from the verifier: its embeddings, final norm and LM head plus a subset of its
decoder layers, so the student starts close to the verifier and shares its vocabulary exactly.

    python -m specheads.student smollm2-135m runs/students/smollm2-every6 --layers every:6
"""

from __future__ import annotations

import argparse
import copy
import re

from .checkpoint import atomic_directory
from .errors import SpecHeadsError


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'every:M' (layers 0, M, 2M, ...), 'first:L', or explicit '0,3,7'."""
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
