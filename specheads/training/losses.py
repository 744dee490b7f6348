"""Losses over next-token distributions, on logits rows of shape [N, V]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Losses return (sum over rows, number of rows) so that the caller can divide by the row count of
# the *global* batch: per-process means averaged by DDP would weight processes, not tokens.


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE summed over rows whose label is not -100, and their count."""
    valid = labels != -100
    total = F.cross_entropy(logits[valid].float(), labels[valid], reduction="sum") if bool(valid.any()) else logits.sum() * 0.0
    return total, valid.sum()


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_teacher || q_student) summed over rows: soft labels from the verifier's own distribution."""
    count = torch.tensor(student_logits.shape[0], device=student_logits.device)
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0, count
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum"), count
