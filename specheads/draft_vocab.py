"""Draft vocabularies: the verifier's tokens ranked by how often they occur in a drafter's
training answers.

A drafter pays for its LM head on every draft token; with SmolLM2's 49152-token vocabulary that
head is most of a small student's cost, while a few thousand tokens cover almost every answer
token (4096 cover 95.6% of the SmolLM2 self-distilled answers). Scoring only the most frequent
ones is lossless, since the verifier still decides every token, and costs only the drafts that
needed a rarer token (FR-Spec, Zhao et al. 2025; EAGLE-3's draft vocabulary does the same).

Medusa heads bake their truncation into the checkpoint (``token_map``, sorted ids). A distilled
draft model stays a plain full-vocabulary model (Hugging Face assisted generation and vLLM load
it as it is) and carries the ranking beside its weights in ``draft_vocab.json``, so the engine
can truncate it at load time to any size (``--draft-vocab N``).
"""

from __future__ import annotations

import json
import os

import torch

from .errors import SpecHeadsError

FILE = "draft_vocab.json"


def answer_token_counts(dataset, vocab_size: int) -> torch.Tensor:
    """[vocab_size] occurrences of each token in the answers (positions from ``prompt_length`` on)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for x in dataset:
        ids = torch.tensor(x["input_ids"][x["prompt_length"] :], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def build_token_map(dataset, vocab_size: int, draft_vocab_size: int) -> torch.Tensor:
    """Medusa's draft vocabulary: the ``draft_vocab_size`` most frequent answer tokens (ids sorted)."""
    top = answer_token_counts(dataset, vocab_size).topk(draft_vocab_size).indices
    return top.sort().values


def write_ranking(folder, counts: torch.Tensor, source: str) -> None:
    """Write ``draft_vocab.json``: the tokens seen, most frequent first (ties by id), and their counts."""
    c = counts.tolist()
    order = sorted((i for i, n in enumerate(c) if n > 0), key=lambda i: (-c[i], i))
    payload = {"source": source, "token_ids": order, "counts": [c[i] for i in order]}
    path = os.path.join(folder, FILE)
    with open(path + ".tmp", "w") as f:  # renamed into place: a crash never leaves half a ranking
        json.dump(payload, f)
    os.replace(path + ".tmp", path)


def read_ranking(folder) -> list[int] | None:
    """The ranked token ids from ``folder/draft_vocab.json``, or None when the folder has none."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            ids = json.load(f)["token_ids"]
    except (OSError, ValueError, KeyError) as exc:
        raise SpecHeadsError(f"draft vocabulary {path} is not a valid ranking file: {exc}") from exc
    if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise SpecHeadsError(f"draft vocabulary {path}: token_ids must be a list of token ids")
    return ids


def top_tokens(folder, size: int, vocab_size: int) -> list[int]:
    """The ``size`` most frequent tokens of the drafter in ``folder``, checked against the vocabulary."""
    ranking = read_ranking(folder)
    if ranking is None:
        raise SpecHeadsError(
            f"--draft-vocab {size}: {folder} has no {FILE} (the token ranking specheads writes when it trains a "
            f"draft model); write one from its training data with `specheads draft-vocab {folder} --data <dataset folder>`"
        )
    if not 1 <= size <= len(ranking):
        raise SpecHeadsError(f"--draft-vocab {size} is out of range: {folder}/{FILE} ranks {len(ranking)} tokens (use 1..{len(ranking)}, or 0 for all)")
    ids = ranking[:size]
    if max(ids) >= vocab_size:
        raise SpecHeadsError(f"{folder}/{FILE} holds token id {max(ids)}, outside the verifier's vocabulary of {vocab_size}")
    return ids
