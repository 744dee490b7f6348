"""What one verifier forward over q new tokens costs on this machine, in milliseconds.

Tree sizes and draft lengths are chosen from this curve, so a wrong curve makes every later run
slower. It is measured (``measure_verify_cost``) in interleaved rounds until each q's median
settles, on a cache of ``CONTEXT`` tokens, and fitted non-decreasing (``fit_nondecreasing``: a
forward over more tokens does not cost less; single medians on a noisy VM said it did). It is kept
per model, dtype, thread count, CPU linears and device in ``verify_cost.json`` beside the other
per-machine choices, only when measured on a quiet machine (``specheads.machine_store``), and
refined online from the engine's own verify forwards (``CostCurve.observe``).
``specheads calibrate`` measures it again and prints it against the bytes read and the FLOPs of
each forward.
"""

from __future__ import annotations

import math
import numbers
import operator
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..errors import SpecHeadsError
from ..machine_store import Measurement, measured_once, time_rounds

SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
CONTEXT = 256
STORE = "verify_cost.json"

__all__ = ["CONTEXT", "SIZES", "CostCurve", "Measurement", "fit_nondecreasing", "measure_verify_cost", "verify_cost_curve"]


def _positive(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _problem(ms) -> str | None:
    """What makes ``ms`` ({q: milliseconds}) no cost curve, or None."""
    if not isinstance(ms, dict) or not ms:
        return f"{ms!r} is not a non-empty mapping of token count to milliseconds"
    for q, v in ms.items():
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            return f"token count {q!r} is not an integer >= 1"
        if not _positive(v):
            return f"q={q} has {v!r} ms, not a positive number"
    return None


def fit_nondecreasing(ms: dict[int, float], weights: dict[int, float] | None = None) -> dict[int, float]:
    """The non-decreasing curve closest to ``ms`` in (weighted) least squares: isotonic regression
    by pooling adjacent violators (a run of q that goes down is replaced by its weighted mean)."""
    qs = sorted(ms)
    blocks: list[list[float]] = []  # [mean, weight, count]
    for q in qs:
        blocks.append([float(ms[q]), float(weights.get(q, 1.0)) if weights else 1.0, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fitted = np.repeat([b[0] for b in blocks], [b[2] for b in blocks])
    return {q: float(v) for q, v in zip(qs, fitted)}


def _interpolate(points: dict[int, float], q: int) -> float:
    """Linear between points; the first value below the first point; past the last, the last
    segment's slope (never below the last value)."""
    qs = sorted(points)
    if q >= qs[-1] and len(qs) > 1:
        a, b = qs[-2], qs[-1]
        slope = max(0.0, (points[b] - points[a]) / (b - a))
        return float(points[b] + slope * (q - b))
    return float(np.interp(q, qs, [points[k] for k in qs]))


class CostCurve:
    """Milliseconds of one verifier forward over q new tokens: non-decreasing in q.

    Built from a measurement (fitted non-decreasing), it is refined online by ``observe``, which
    the engine calls with every real verify forward. Each observation is divided by the calibrated
    cost of its q, and each observed q's ratio is the median of its last ``WINDOW`` (9) ratios,
    the window filled up with the ratio the better-observed q predict for it (at first 1.0, the
    calibration). So up to 4 outliers among a q's last 9 forwards (another process waking up)
    leave its estimate within the range of the normal ones, and a persistent change (a slower
    machine, a real context longer than the calibration's) is followed once 5 of a q's last 9
    forwards show it, and at once by a q newly observed after a well-observed one showed it. A q
    not observed takes the ratio of its observed neighbours (interpolated; beyond the observed
    range, the nearest one's), so the q the engine uses move the whole curve. The result is fitted
    non-decreasing again; ``points`` is that curve. A q observed long ago keeps its estimate until
    it is observed again.
    """

    WINDOW = 9

    def __init__(self, ms: dict[int, float], source: str = "measured"):
        try:
            ms = {operator.index(q): v for q, v in dict(ms).items()}
        except TypeError:
            raise SpecHeadsError(f"cost curve: token counts must be integers, got {list(ms)}") from None
        why = _problem(ms)
        if why:
            raise SpecHeadsError(f"cost curve: {why}")
        self.calibration = fit_nondecreasing(ms)
        self.points = dict(self.calibration)
        self.source = source
        self.measurement: Measurement | None = None
        self._ratios: dict[int, deque] = {}

    def __call__(self, q: int) -> float:
        return _interpolate(self.points, _tokens(q))

    def observe(self, q: int, seconds: float) -> None:
        q = _tokens(q)
        if not _positive(seconds):
            raise SpecHeadsError(f"verify forward of q={q} tokens took {seconds!r} s: a duration must be a positive number")
        self._ratios.setdefault(q, deque(maxlen=self.WINDOW)).append(seconds * 1e3 / _interpolate(self.calibration, q))
        estimate: dict[int, float] = {}
        for k in sorted(self._ratios, key=lambda k: (-len(self._ratios[k]), k)):  # the best-observed first
            known = sorted(estimate)
            prior = float(np.interp(k, known, [estimate[x] for x in known])) if known else 1.0
            r = self._ratios[k]
            estimate[k] = statistics.median([*r, *[prior] * (self.WINDOW - len(r))])
        observed = sorted(estimate)
        qs = sorted(set(self.calibration) | set(observed))
        ratio = np.interp(qs, observed, [estimate[k] for k in observed])  # flat beyond the observed range
        self.points = fit_nondecreasing({k: _interpolate(self.calibration, k) * float(r) for k, r in zip(qs, ratio)})

    def __repr__(self) -> str:
        return f"CostCurve({', '.join(f'q={q} {ms:.1f}' for q, ms in sorted(self.points.items()))} ms; {self.source})"


def _tokens(q) -> int:
    try:
        q = operator.index(q)
    except TypeError:
        raise SpecHeadsError(f"token count {q!r} must be an integer >= 1") from None
    if q < 1:
        raise SpecHeadsError(f"token count {q} must be >= 1")
    return q


def device_key(model) -> str:
    """What the curve depends on: the model, dtype, threads, CPU and torch (``machine_key``), which
    linears are streamed, and the device."""
    from ..streamed_linear import linears_key, machine_key

    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{machine_key(model)}|{linears_key(model)}|{where}"


@torch.inference_mode()
def measure_verify_cost(model, sizes=SIZES, context: int = CONTEXT, *, timer=time.perf_counter, clock=time.monotonic,
                        load=None, cpu_clock=None, **timing) -> Measurement:
    """Time one forward of q new tokens on a cache of ``context`` random tokens, for each q of
    ``sizes``, in interleaved rounds until every median settles (``machine_store.time_rounds``;
    ``timing``: its tolerance, min_rounds, max_rounds, max_seconds, quick_if_busy). The result's
    ``ms`` are the medians, ``spread`` their interquartile ranges, ``stable`` whether they
    settled, ``refusal`` why it must not be stored. ``load`` (the 1-minute load average) and
    ``cpu_clock`` (the process's CPU seconds) default to the machine's; the CPU-share check runs on
    CPU models only."""
    from .kv_cache import cache_kwargs, new_cache, truncate_cache

    sizes = sorted({_tokens(q) for q in sizes})
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    cache = new_cache(model)
    kw = cache_kwargs(model, cache)
    model(input_ids=torch.randint(vocab, (1, context), generator=g).to(device), **kw, use_cache=True, logits_to_keep=1)
    ids = {q: torch.randint(vocab, (1, q), generator=g).to(device) for q in sizes}

    def run(q):
        model(input_ids=ids[q], **kw, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return time_rounds(sizes, run, prepare=lambda q: truncate_cache(cache, context), timer=timer, clock=clock, load=load,
                       cpu_clock=cpu_clock, check_cpu=device.type == "cpu", label=lambda q: f"q={q}", **timing)


def fitting(model, sizes) -> tuple[int, tuple[int, ...]]:
    """(context, sizes) that fit the model's positions and attention window: CONTEXT and every size
    when they do; else a context of half the limit and the sizes that fit after it (tiny models,
    short windows)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # Rotary models run past max_position_embeddings (timing only needs them to run); learned
    # position tables (GPT-2's n_positions) and attention windows do not.
    rotary = getattr(cfg, "rope_parameters", None) is not None or getattr(cfg, "rope_theta", None) is not None
    keys = ("n_positions", "sliding_window") + (() if rotary else ("max_position_embeddings",))
    limits = [getattr(cfg, k, None) for k in keys]
    limit = min((int(x) for x in limits if isinstance(x, int) and x > 0), default=None)
    if limit is None or CONTEXT + max(sizes) <= limit:
        return CONTEXT, tuple(sizes)
    context = limit // 2
    return context, tuple(q for q in sizes if context + q <= limit) or (1,)


def _check_entry(entry, sizes, context: int = CONTEXT) -> str | None:
    """What is wrong with a stored curve (None: usable)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("ms"), dict) or "measurement" not in entry:
        return "not a curve with its measurement record; an older specheads stored it"
    if entry.get("context") != context:
        return f"measured on a cache of {entry.get('context')!r} tokens, not {context}"
    try:
        ms = {int(q): v for q, v in entry["ms"].items()}
    except ValueError:
        return f"token counts {list(entry['ms'])} are not all integers"
    why = _problem(ms)
    if why:
        return why
    qs = sorted(ms)
    down = next(((a, b) for a, b in zip(qs, qs[1:]) if ms[b] < ms[a]), None)
    if down:
        a, b = down
        return f"not non-decreasing: q={a} {ms[a]} ms, q={b} {ms[b]} ms"
    missing = sorted(set(sizes) - set(ms))
    if missing:
        return f"no value for q={', '.join(map(str, missing))}"
    return None


def verify_cost_curve(model, *, store=None, remeasure: bool = False, quiet: bool = False, timer=None, sizes=SIZES,
                      force: bool = False, **timing) -> CostCurve:
    """This model's cost curve on this machine: the stored one for its ``device_key``, or measured
    now, fitted, and stored when the measurement may be kept (``force``: even when not, with a
    warning). ``timing``: ``measure_verify_cost``'s options. A measurement the store refused has
    ``source`` 'measured (not stored)'; the curve's ``measurement`` is None when reused."""
    from ..verifier import cache_dir

    store = Path(store) if store is not None else cache_dir() / STORE
    context, sizes = fitting(model, tuple(sorted({_tokens(q) for q in sizes})))
    taken: list[Measurement] = []

    def measure():
        if not quiet:
            print(f"[specheads] measuring the verifier's forward cost for q = {', '.join(map(str, sizes))} new tokens "
                  f"(rounds until the medians settle; kept per model, dtype, threads and device in {store})",
                  file=sys.stderr, flush=True)
        m = measure_verify_cost(model, sizes, context, timer=timer or time.perf_counter, **timing)
        taken.append(m)
        entry = {"ms": {q: round(v, 3) for q, v in fit_nondecreasing(m.ms).items()},
                 "measured_ms": {q: round(v, 3) for q, v in m.ms.items()},
                 "spread": {q: round(s, 4) for q, s in m.spread.items()},
                 "context": context, "measurement": m.record()}
        return entry, m.refusal

    entry, reused = measured_once(store, device_key(model), measure, refresh=remeasure, force=force,
                                  check=lambda e: _check_entry(e, sizes, context), what="verifier cost per token count")
    if reused:
        source = "stored"
    elif taken[0].refusal and not force:
        source = "measured (not stored)"
    else:
        source = "measured"
    curve = CostCurve({int(q): v for q, v in entry["ms"].items()}, source=source)
    curve.measurement = taken[0] if taken else None
    return curve


def forward_work(model, q: int, context: int = CONTEXT) -> tuple[int, int]:
    """(bytes read, FLOPs) of one forward of q new tokens on a cache of ``context``: every weight
    that multiplies (embedding lookups gather q rows only; a tied LM head multiplies) and the KV
    cache are read once; 2 FLOPs per multiplying weight per token, plus attention over the cache."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings().weight
    gathered = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()} - {id(head)}
    params = {id(p): p for p in model.parameters()}
    multiplying = [p for i, p in params.items() if i not in gathered]
    n = sum(p.numel() for p in multiplying)
    size = head.element_size()
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    kv_bytes = 2 * layers * kv_heads * head_dim * (context + q) * size
    attention = 4 * layers * heads * head_dim * q * (context + q)  # scores and weighted values
    return n * size + kv_bytes, 2 * n * q + attention


def cost_rows(model, curve: CostCurve, context: int = CONTEXT) -> list[dict]:
    """One row per q of the curve: the fitted and measured ms, the spread, bytes, FLOPs and rates."""
    m = curve.measurement
    rows = []
    for q in sorted(curve.points):
        ms = curve(q)
        read, flops = forward_work(model, q, context)
        rows.append({"q": q, "ms": ms, "measured_ms": m.ms.get(q) if m else None, "spread": m.spread.get(q) if m else None,
                     "mb_read": read / 1e6, "gflop": flops / 1e9, "gb_per_s": read / ms / 1e6, "gflop_per_s": flops / ms / 1e6})
    return rows


def _number(x: float) -> str:
    """Three significant digits, without exponents for large values."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def format_rows(rows: list[dict], *, markdown: bool = False) -> str:
    """The rows of ``cost_rows`` as an aligned text table, or a markdown one."""
    head = ["q", "ms (fitted)", "ms (median)", "spread", "MB read", "GFLOP", "GB/s", "GFLOP/s"]
    body = [[str(r["q"]), f"{r['ms']:.1f}", "-" if r["measured_ms"] is None else f"{r['measured_ms']:.1f}",
             "-" if r["spread"] is None else f"{r['spread']:.0%}",
             *(_number(r[k]) for k in ("mb_read", "gflop", "gb_per_s", "gflop_per_s"))] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" for line in [head, ["---"] * len(head), *body])
    width = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, width)) for line in [head, *body])
