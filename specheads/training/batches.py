"""Training batches: conversations of token ids, right-padded, with the answer positions marked."""

from __future__ import annotations

import torch


def collate(batch: list[dict], pad_id: int, indices: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad input_ids; answer_mask marks answer tokens (the ones losses may target);
    ``index`` (the examples' dataset indices) lets the hidden-state cache find them."""
    T = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    answer = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        attn[i, :n] = 1
        answer[i, x["prompt_length"] : n] = 1
    out = {"input_ids": ids, "attention_mask": attn, "answer_mask": answer}
    if indices is not None:
        out["index"] = torch.tensor(indices, dtype=torch.long)
    return out
