"""How many nodes a draft tree should hold on this machine.

A tree of n nodes is verified in one forward of n + 1 tokens. On a GPU that costs about what one
token costs until the GPU fills; on a CPU it grows with every token. So the budget is measured,
not assumed: the verifier's forward time per token count (on a cache of ``CONTEXT`` tokens) is
timed once per model, dtype, thread count and device, and kept in ``verify_cost.json`` beside the
other per-machine choices. The chosen n maximises

    (1 + E[accepted | n]) / t_verify(n + 1)

where E[accepted | n] is the expected accepted length of the best n-node tree under the
drafter's held-out accuracy per draft step and rank, recorded at training (the same greedy
construction as Medusa's trees, ``drafters.medusa.best_tree``). The drafter's own cost does not
depend on n (a dynamic tree runs one drafter forward per level whatever its size), so it does not
enter the choice.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
CONTEXT = 256
# Accuracy per step and rank assumed for a drafter that recorded none (an EAGLE-3 drafter after
# light training on a small verifier: step 0 right a third of the time).
FALLBACK_ACCURACY = [[0.35, 0.12, 0.06, 0.04], [0.45, 0.12, 0.05, 0.03], [0.5, 0.1, 0.05, 0.03], [0.5, 0.1, 0.05, 0.03], [0.5, 0.1, 0.05, 0.03]]


def device_key(model) -> str:
    from ..streamed_linear import machine_key

    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{machine_key(model)}|{where}"


@torch.inference_mode()
def measure_verify_cost(model, sizes=SIZES, context: int = CONTEXT, repeats: int = 5) -> dict[int, float]:
    """Median milliseconds of one forward of q new tokens on a cache of ``context`` tokens."""
    from .kv_cache import cache_kwargs, new_cache, truncate_cache

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(vocab, (1, context), generator=g).to(device)
    cache = new_cache(model)
    kw = cache_kwargs(model, cache)
    model(input_ids=prefix, **kw, use_cache=True, logits_to_keep=1)
    out = {}
    for q in sizes:
        ids = torch.randint(vocab, (1, q), generator=g).to(device)
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, **kw, use_cache=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
            truncate_cache(cache, context)
        out[q] = round(sorted(times[1:])[len(times[1:]) // 2] * 1e3, 2)
    return out


def verify_cost(model, store: str | os.PathLike | None = None, *, remeasure: bool = False) -> tuple[dict[int, float], bool]:
    """(ms per token count, reused from the store?) for this model on this machine."""
    from ..verifier import cache_dir

    store = Path(store) if store is not None else cache_dir() / "verify_cost.json"
    from ..machine_store import measured_once

    cost, reused = measured_once(store, device_key(model), lambda: measure_verify_cost(model), refresh=remeasure)
    return {int(q): ms for q, ms in cost.items()}, reused


def step_accuracy(eval_metrics: dict | None) -> list[list[float]] | None:
    """[step][rank] held-out accuracy recorded by EAGLE-3 training (given the earlier steps were
    reachable), or None."""
    if not eval_metrics or "eval/cond_rank0_step0" not in eval_metrics:
        return None
    acc, i = [], 0
    while f"eval/cond_rank0_step{i}" in eval_metrics:
        row, r = [], 0
        while f"eval/cond_rank{r}_step{i}" in eval_metrics:
            row.append(float(eval_metrics[f"eval/cond_rank{r}_step{i}"]))
            r += 1
        acc.append(row)
        i += 1
    return acc


def expected_accepted(accuracy: list[list[float]], size: int) -> float:
    from ..drafters.medusa import best_tree

    total = 0.0
    for path in best_tree(accuracy, size):
        p = 1.0
        for depth, rank in enumerate(path):
            p *= accuracy[depth][rank]
        total += p
    return total


def best_size(cost: dict[int, float], accuracy: list[list[float]]) -> tuple[int, dict[int, float]]:
    """The node count with the most expected tokens per millisecond of verification, and that rate per size."""
    rate = {n: (1 + expected_accepted(accuracy, n)) / cost[n + 1] for n in sorted(cost) if n + 1 in cost}
    return max(rate, key=lambda n: (rate[n], -n)), rate


def choose_tree_size(verifier, drafter_model, *, depth: int = 5, quiet: bool = False) -> int:
    """The tree budget for this drafter on this machine (see the module docstring)."""
    record = getattr(drafter_model, "training_record", None) or {}
    accuracy = step_accuracy(record.get("eval")) or FALLBACK_ACCURACY
    accuracy = accuracy[:depth]
    cost, reused = verify_cost(verifier.model)
    n, rate = best_size(cost, accuracy)
    if not quiet:
        print(f"[specheads] tree size auto: {n} nodes (verify ms per token count {'reused' if reused else 'measured now'}: "
              + ", ".join(f"q={q} {ms:.0f}" for q, ms in sorted(cost.items())) + ")", file=sys.stderr, flush=True)
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
