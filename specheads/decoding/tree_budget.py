"""How many nodes a draft tree should hold on this machine.

A tree of n nodes is verified in one forward of n + 1 tokens. On a GPU that costs about what one
token costs until the GPU fills; on a CPU it grows with every token. So the budget is measured,
not assumed: the verifier's forward time per token count comes from ``decoding.cost`` (measured
once per model, dtype, thread count and device, kept only when the machine was quiet). The
chosen n (at most one less than the largest token count measured) maximises

    (1 + E[accepted | n]) / t_verify(n + 1)

where E[accepted | n] is the expected accepted length of the best n-node tree under the
drafter's held-out accuracy per draft step and rank, recorded at training (the same greedy
construction as Medusa's trees, ``drafters.medusa.best_tree``). The drafter's own cost does not
depend on n (a dynamic tree runs one drafter forward per level whatever its size), so it does not
enter the choice.
"""

from __future__ import annotations

import sys
from typing import Callable

from .cost import CostCurve, verify_cost_curve

# Accuracy per step and rank assumed for a drafter that recorded none (an EAGLE-3 drafter after
# light training on a small verifier: step 0 right a third of the time).
FALLBACK_ACCURACY = [[0.35, 0.12, 0.06, 0.04], [0.45, 0.12, 0.05, 0.03], [0.5, 0.1, 0.05, 0.03], [0.5, 0.1, 0.05, 0.03], [0.5, 0.1, 0.05, 0.03]]


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


def _path_probabilities(accuracy: list[list[float]], size: int) -> list[float]:
    """The acceptance probability of each node of the best ``size``-node tree, in the order the
    greedy construction adds them (so the first n make the best n-node tree)."""
    from ..drafters.medusa import best_tree

    out = []
    for path in best_tree(accuracy, size):
        p = 1.0
        for depth, rank in enumerate(path):
            p *= accuracy[depth][rank]
        out.append(p)
    return out


def expected_accepted(accuracy: list[list[float]], size: int) -> float:
    return sum(_path_probabilities(accuracy, size))


def best_size(cost: Callable[[int], float] | dict[int, float], accuracy: list[list[float]], max_nodes: int | None = None) -> tuple[int, dict[int, float]]:
    """The node count with the most expected tokens per millisecond of verification, and that rate
    per size. ``cost``: a CostCurve (or {q: ms}); sizes up to ``max_nodes``, by default one less
    than the largest token count the curve holds."""
    curve = cost if isinstance(cost, CostCurve) else CostCurve(cost, source="given")
    max_nodes = max_nodes or max(1, max(curve.points) - 1)
    probs = _path_probabilities(accuracy, max_nodes)
    rate, expected = {}, 0.0
    for n in range(1, max_nodes + 1):
        expected += probs[n - 1] if n <= len(probs) else 0.0  # a full tree gains nothing from more nodes
        rate[n] = (1 + expected) / curve(n + 1)
    return max(rate, key=lambda n: (rate[n], -n)), rate


def choose_tree_size(verifier, drafter_model, *, depth: int = 5, quiet: bool = False) -> int:
    """The tree budget for this drafter on this machine (see the module docstring)."""
    record = getattr(drafter_model, "training_record", None) or {}
    accuracy = step_accuracy(record.get("eval")) or FALLBACK_ACCURACY
    accuracy = accuracy[:depth]
    curve = verify_cost_curve(verifier.model, quiet=quiet)
    n, rate = best_size(curve, accuracy)
    if not quiet:
        shown = [q for q in sorted(curve.points) if q <= max(8, n + 1)]
        print(f"[specheads] tree size auto: {n} nodes (verify ms per token count, {curve.source}: "
              + ", ".join(f"q={q} {curve(q):.0f}" for q in shown) + ")", file=sys.stderr, flush=True)
    return n
