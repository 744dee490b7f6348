"""What each drafter kind learns from the verifier, behind one registry.

The training loop names no drafter kind. It asks ``make_objective`` for the recipe's objective,
which has ``module`` (what the optimizer trains and accelerate wraps), ``param_groups``,
``loss(module, batch, normalize)``, ``eval_counts`` / ``summarize`` and
``save(state_dict, path, training=...)``. Each kind is one module (``KINDS``) defining
``LOSSES`` (the first is the default), ``build(recipe, verifier, train_ds)`` and, where it has
any, ``check_recipe(recipe)`` (settings alone, before anything loads) and
``check_for_verifier(recipe, verifier)`` (before data is prepared).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import SpecHeadsError

KINDS = {
    "medusa": "specheads.training.objectives.medusa",
    "draft_model": "specheads.training.distill",
    "eagle3": "specheads.training.objectives.eagle3",
}


def kind_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise SpecHeadsError(f"recipe value drafter.kind={kind!r} is not a drafter kind (choose {', '.join(KINDS)})")
    return importlib.import_module(KINDS[kind])


def make_objective(recipe, verifier, train_ds):
    """The objective for the recipe's drafter kind."""
    return kind_module(recipe.drafter.kind).build(recipe, verifier, train_ds)


def feature_capture(recipe, verifier):
    """What self-distillation should capture of the verifier's features for this kind (its
    ``feature_capture``), or None."""
    capture = getattr(kind_module(recipe.drafter.kind), "feature_capture", None)
    return capture(recipe, verifier) if capture is not None else None


def check_recipe_for_verifier(recipe, verifier) -> None:
    """The recipe checks that need the verifier but no data: run before data preparation."""
    check = getattr(kind_module(recipe.drafter.kind), "check_for_verifier", None)
    if check is not None:
        check(recipe, verifier)


def __getattr__(name):  # the Medusa objective's old import path, loaded on use
    if name in ("MedusaObjective", "MedusaTrainingModule"):
        return getattr(kind_module("medusa"), name)
    raise AttributeError(name)
