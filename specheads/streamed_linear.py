"""Linear layers that stay fast for few-token forwards on CPU.

Speculative decoding's verify step is a forward over a few tokens (k + 1, or a small tree). With
MKL, torch's CPU BLAS, ``x @ W.T`` for a handful of rows packs the whole weight ``W`` into its
GEMM layout on every call, so on a 2-core CPU a 4-token forward of SmolLM2 costs about 2x a
1-token one, although both read every weight once. ``(W @ x.T).T`` is the same product that
packs only the few rows of ``x`` and streams ``W``; there the 4-token forward costs about 1.2x.
Which form wins depends on the CPU, the thread count and the row count, so ``tune_streaming``
measures the model's own forward at each row count and keeps the faster form; nothing is
assumed. The choice is kept per machine only when measured on a quiet machine
(``specheads.machine_store``).

A ``StreamedLinear`` shares its ``nn.Linear``'s parameters (tied embeddings stay tied) and
streams only for CPU inputs whose row count is in its ``rows`` set. One-token forwards are never
streamed, so plain decoding is unchanged. Results equal ``nn.Linear``'s to float rounding, not
bit for bit; plain decoding, speculative decoding and Hugging Face ``generate`` all run through
the same modules, so they stay comparable. On CUDA nothing changes.
"""

from __future__ import annotations

import os
import platform
from typing import Iterable

import torch
from torch import nn


class StreamedLinear(nn.Linear):
    """``nn.Linear`` computing ``(W @ x.T).T`` for CPU inputs of ``rows`` rows (a set of counts)."""

    @classmethod
    def wrap(cls, linear: nn.Linear, rows: Iterable[int] = ()) -> "StreamedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters
        new.rows = frozenset(int(r) for r in rows)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows not in self.rows or x.device.type != "cpu":
            return nn.functional.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", streamed_rows={sorted(self.rows)}"


class Float32Head(StreamedLinear):
    """A reduced-precision LM head whose logits are float32 where they decide: the top ``refine``
    tokens of each row are recomputed in float32 from the same input row and weights, the rest
    keep the head's own rounded values. A bfloat16 logit is rounded to 8 significant bits (steps of
    0.125 at 16..32), so exact top-2 ties are common and any rounding difference between forwards
    decides them; refined, argmax and top-2 gap are the float32 computation's at the cost of a few
    dot products, where a float32 copy of the head would double the bytes it reads per token.

    Where a token outside the top ``refine`` could still beat the refined runner-up (its value is
    within one step of it: many near-equal logits), that row is computed wholly in float32.
    ``weight`` is the head's own Parameter (tied embeddings stay tied and in their dtype); nothing
    is added to the state dict. Streams like a ``StreamedLinear``."""

    refine = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = super().forward(x)
        rows = low.reshape(-1, self.out_features)
        xs = x.reshape(-1, self.in_features).float()
        k = min(self.refine, self.out_features)
        top = rows.topk(k, dim=-1)
        exact = torch.einsum("rh,rkh->rk", xs, self.weight[top.indices].float())
        if self.bias is not None:
            exact = exact + self.bias.float()[top.indices]
        out = rows.float().scatter(-1, top.indices, exact)
        if k < self.out_features:
            runner_up = exact.topk(min(2, k), dim=-1).values[:, -1]
            kth = top.values[:, -1].float()
            # one step of the head's dtype at that magnitude covers its rounding (half a step) and accumulation order
            step = torch.finfo(low.dtype).eps * torch.ldexp(torch.ones_like(kth), torch.frexp(torch.maximum(kth.abs(), runner_up.abs())).exponent - 1)
            unsure = (kth + step >= runner_up).nonzero().flatten()
            if len(unsure):
                bias = None if self.bias is None else self.bias.float()
                out[unsure] = nn.functional.linear(xs[unsure], self.weight.float(), bias)
        return out.reshape(*low.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", float32 top-{self.refine} logits"


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every plain or streamed ``nn.Linear`` (not peft / quantised subclasses)."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in (nn.Linear, StreamedLinear, Float32Head):
                found.append((parent, name, child))
    return found


def stream_linears(model: nn.Module, head_rows: Iterable[int] = (), layer_rows: Iterable[int] = ()) -> nn.Module:
    """Stream ``model``'s LM head for ``head_rows`` and every other plain ``nn.Linear`` for ``layer_rows``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_rows, layer_rows = frozenset(head_rows), frozenset(layer_rows)
    for parent, name, layer in _linears(model):
        rows = head_rows if layer is head else layer_rows
        if isinstance(layer, StreamedLinear):
            layer.rows = rows
        else:
            setattr(parent, name, StreamedLinear.wrap(layer, rows))
    return model


def _fill(chosen: list[int], measured: list[int]) -> list[int]:
    """Row counts between two measured, chosen neighbours count as chosen too."""
    out = set(chosen)
    for lo, hi in zip(measured, measured[1:]):
        if lo in out and hi in out:
            out.update(range(lo, hi))
    return sorted(out)


def tune_streaming(model: nn.Module, *, rows: Iterable[int] = (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64), context: int = 128,
                   margin: float = 0.03, **timing) -> dict:
    """Time the model's forward over ``rows`` new tokens after ``context`` cached ones with linears
    packed (as torch does), the LM head streamed, and every linear streamed, interleaved in rounds
    until the medians settle (``machine_store.time_rounds``; ``timing``: its options, e.g. the
    timer, the load source, tolerance, max_seconds); keep for each row count the fastest form
    (streaming must win by ``margin``). Returns what was chosen and measured, with ``refusal``:
    why the choice must not be stored (a busy machine, medians that never settled), or None.
    Only for CPU models; a model on another device is left as it is.
    """
    from .decoding.kv_cache import cache_kwargs, new_cache, truncate_cache
    from .machine_store import time_rounds

    device = next(model.parameters()).device
    if device.type != "cpu":
        return {"device": str(device), "head_rows": [], "layer_rows": [], "refusal": None}
    rows = sorted({int(r) for r in rows if int(r) >= 2})
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    past = torch.randint(0, vocab, (1, context), generator=gen)
    ids = {q: torch.randint(0, vocab, (1, q), generator=gen) for q in rows}
    forms = {"packed": ((), ()), "head": (rows, ()), "all": (rows, rows)}
    with torch.inference_mode():
        cache = new_cache(model)
        kw = cache_kwargs(model, cache)
        model(input_ids=past, **kw, use_cache=True)

        def prepare(case):
            truncate_cache(cache, context)
            stream_linears(model, *forms[case[0]])

        m = time_rounds([(f, q) for f in forms for q in rows], lambda case: model(input_ids=ids[case[1]], **kw, use_cache=True),
                        prepare=prepare, label=lambda case: f"{case[0]} q={case[1]}", **timing)
    median = m.medians
    head_rows, layer_rows = [], []
    for q in rows:
        packed = median[("packed", q)]
        best = min(forms, key=lambda f: median[(f, q)])
        if best != "packed" and median[(best, q)] < (1 - margin) * packed:
            head_rows.append(q)
            if best == "all":
                layer_rows.append(q)
    head_rows, layer_rows = _fill(head_rows, rows), _fill(layer_rows, rows)
    stream_linears(model, head_rows, layer_rows)
    return {
        "device": "cpu", "threads": torch.get_num_threads(), "head_rows": head_rows, "layer_rows": layer_rows,
        "forward_ms": {f: {q: round(median[(f, q)] * 1e3, 1) for q in rows} for f in forms},
        "measurement": m.record(), "refusal": m.refusal,
    }


def linears_key(model: nn.Module) -> str:
    """Which linears stream for which row counts: what a forward's cost also depends on."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    streamed = {"head" if layer is head else "layers": sorted(layer.rows) for _, _, layer in _linears(model)
                if isinstance(layer, StreamedLinear) and layer.rows}
    return "linears=" + (",".join(f"{k}:{v[0]}-{v[-1]}" if v == list(range(v[0], v[-1] + 1)) else f"{k}:{'+'.join(map(str, v))}"
                                  for k, v in sorted(streamed.items())) or "packed")


def machine_key(model: nn.Module) -> str:
    """What a tuning result depends on: the model (its shape and LM-head fingerprint, not its
    path), its dtype, the thread count, the CPU and torch."""
    from .model_id import fingerprint

    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", "?"))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if isinstance(model.get_output_embeddings(), Float32Head):
        dtype += "+float32-head"  # a different head cost per token count
    head = fingerprint(model)  # hashes LM-head rows: once
    model_id = f"{cfg.model_type}-{layers}x{head['hidden_size']}-{head['lm_head_sha256']}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{model_id}|{dtype}|threads={torch.get_num_threads()}|{cpu}|torch={torch.__version__}"


def _check_choice(entry) -> str | None:
    """What is wrong with a stored CPU-linears choice (None: usable)."""
    if not isinstance(entry, dict) or "measurement" not in entry:
        return "not a choice with its measurement record; an older specheads stored it"
    for name in ("head_rows", "layer_rows"):
        rows = entry.get(name)
        if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 2 for r in rows):
            return f"{name} is {rows!r}, not a list of token counts >= 2"
    if not set(entry["layer_rows"]) <= set(entry["head_rows"]):
        return f"layer_rows {entry['layer_rows']} stream where the LM head does not ({entry['head_rows']})"
    ms = entry.get("forward_ms")
    if not isinstance(ms, dict) or set(ms) != {"packed", "head", "all"} or not all(isinstance(v, dict) and v for v in ms.values()):
        return "forward_ms is not the packed / head / all timings"
    bad = [(f, q, t) for f, v in ms.items() for q, t in v.items()
           if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0]
    if bad:
        f, q, t = bad[0]
        return f"forward_ms {f} q={q} is {t!r}, not a positive number of ms"
    return None


def tune_or_reuse(model: nn.Module, key: str, store: str | os.PathLike, *, retune: bool = False, force: bool = False,
                  **timing) -> dict:
    """``tune_streaming`` once per ``key`` (see ``machine_key``), its choice kept in the json file
    ``store`` when measured on a quiet machine (``force``: even when not, with a warning); later
    calls apply the stored choice without timing (``retune`` times again). A stored choice that is
    unreadable or malformed is measured again, with a message."""
    from .machine_store import measured_once

    def measure():
        report = tune_streaming(model, **timing)
        return {k: v for k, v in report.items() if k != "refusal"}, report["refusal"]

    report, reused = measured_once(store, key, measure, refresh=retune, force=force, check=_check_choice, what="CPU-linears choice")
    if reused:  # a fresh tuning has already streamed the model's linears
        stream_linears(model, report["head_rows"], report["layer_rows"])
    return {**report, "reused": reused}
