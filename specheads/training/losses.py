"""Losses over next-token distributions, on logits rows of shape [N, V].

Notation: p is the teacher's (the verifier's) distribution, q the student's (the drafter's), both
softmax(logits / temperature). Distillation divergences (DistillSpec, Zhou et al.):

* ``forward_kl``  KL(p || q) = sum p (log p - log q): mass-covering; the student must put mass
  wherever the verifier does.
* ``reverse_kl``  KL(q || p) = sum q (log q - log p): mode-seeking.
* ``jsd``         generalised Jensen-Shannon with mixing weight beta on the teacher (GKD / TRL
  convention): m = beta p + (1 - beta) q, JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m).
  That formula is identically 0 at beta = 0 (m = q) and beta = 1 (m = p); there the loss is its
  limiting direction instead: beta = 0 is forward KL, beta = 1 is reverse KL.
* ``total_variation``  TVD = 1/2 sum |p - q| = 1 - sum min(p, q). Speculative sampling accepts a
  draft token with probability sum min(p, q), so TVD is exactly 1 - the acceptance rate.

Every term uses the convention 0 log 0 = 0: log-probabilities come from ``log_softmax``, terms
whose weight is zero are masked with ``where``, and log-probabilities are clamped to ``LOG_FLOOR``,
so logits of -inf (masked tokens) give no NaN, in values or gradients, and disjoint supports give
a large but finite forward / reverse KL. (A row whose logits are all -inf has no distribution; it
is the caller's to mask.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Losses return (sum over rows, number of rows) so that the caller can divide by the row count of
# the *global* batch: per-process means averaged by DDP would weight processes, not tokens.

# exp(-1e4) is 0 in every float dtype: clamping here changes no finite value, only keeps -inf out.
LOG_FLOOR = -1e4


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE summed over rows whose label is not -100, and their count."""
    valid = labels != -100
    total = F.cross_entropy(logits[valid].float(), labels[valid], reduction="sum") if bool(valid.any()) else logits.sum() * 0.0
    return total, valid.sum()


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, from log-probabilities; terms where a = 0 are 0 whatever b is."""
    a = log_a.exp()
    diff = log_a.clamp_min(LOG_FLOOR) - log_b.clamp_min(LOG_FLOOR)
    return torch.where(a > 0, a * diff, torch.zeros_like(diff)).sum(-1)


def _rows(student_logits: torch.Tensor, per_row) -> tuple[torch.Tensor, torch.Tensor]:
    count = torch.tensor(student_logits.shape[0], device=student_logits.device)
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0, count
    return per_row().sum(), count


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_teacher || q_student) summed over rows: soft labels from the verifier's own distribution."""
    return _rows(student_logits, lambda: _kl_rows(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q_student || p_teacher) summed over rows."""
    return _rows(student_logits, lambda: _kl_rows(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)))


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised JSD with weight ``beta`` on the teacher (see the module doc; beta 0 / 1 = FKL / RKL)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)

    def per_row():
        log_p, log_q = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
        # floored first: logaddexp(-inf, -inf) has a NaN gradient
        log_m = torch.logaddexp(log_p.clamp_min(LOG_FLOOR) + math.log(beta), log_q.clamp_min(LOG_FLOOR) + math.log(1.0 - beta))
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)

    return _rows(student_logits, per_row)


def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """TVD(p, q) = 1/2 sum |p - q| = 1 - (speculative sampling's acceptance rate), summed over rows."""
    return _rows(student_logits, lambda: 0.5 * (log_probs(teacher_logits, temperature).exp() - log_probs(student_logits, temperature).exp()).abs().sum(-1))


def acceptance_rate(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per row, sum min(p, q): the probability that speculative sampling accepts the student's draft."""
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return torch.minimum(p, q).sum(-1)


DIVERGENCES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "tvd": total_variation}


def divergence(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5):
    """One of ``DIVERGENCES`` by name, as (sum over rows, row count)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r} (known: {', '.join(DIVERGENCES)})")
    if name == "jsd":
        return jsd(student_logits, teacher_logits, temperature, beta)
    return DIVERGENCES[name](student_logits, teacher_logits, temperature)
