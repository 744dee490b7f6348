"""Verification rules: which drafted tokens to keep, and the verifier's own next token.

Pure functions over one verify step, named as in the papers. Terms (as in vLLM's rejection
sampler): a drafted token is *accepted* when the rule keeps it; at the first rejection the
verifier emits a *recovered* token drawn from the residual distribution; when every draft is
accepted it emits a *bonus* token from its distribution after the last draft. Either way each
step emits ``n_accepted + 1`` tokens.
"""

from __future__ import annotations

import torch


def greedy_verify(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, int]:
    """Temperature 0: keep the longest prefix of drafts equal to the verifier's argmax.

    target_logits: [k+1, V], row i scores the token after draft i-1 (row 0: after the pending token).
    draft_tokens: [k].
    Returns (n_accepted, next_token) where next_token is the verifier's argmax after the prefix.
    """
    target = target_logits.argmax(-1)
    k = draft_tokens.numel()
    # One host sync for the whole step.
    target_list = target.tolist()
    drafts = draft_tokens.tolist()
    n = 0
    while n < k and drafts[n] == target_list[n]:
        n += 1
    return n, target_list[n]


def speculative_sampling(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), lossless for any drafter.

    Draft x_i ~ q_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection the token is resampled from normalise(max(0, p_i - q_i)), and if all k are
    accepted a bonus token is drawn from p_k. The emitted tokens then follow p exactly.

    target_probs: [k+1, V] verifier probabilities (already temperature / top-k / top-p warped).
    draft_probs: [k, V] drafter probabilities, or None for a deterministic drafter (q one-hot).
    """
    k = draft_tokens.numel()
    device = target_probs.device
    idx = torch.arange(k, device=device)
    p_x = target_probs[idx, draft_tokens]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs[idx, draft_tokens]
    u = torch.rand(k, device=device, generator=generator)
    # u * q < p  <=>  u < p / q, without dividing by a zero q.
    accepted = (u * q_x < p_x).tolist()
    n = 0
    while n < k and accepted[n]:
        n += 1
    if n == k:
        dist = target_probs[k]
    else:
        q = (
            torch.nn.functional.one_hot(draft_tokens[n], target_probs.shape[-1]).to(target_probs.dtype)
            if draft_probs is None
            else draft_probs[n]
        )
        residual = (target_probs[n] - q).clamp_min(0)
        total = residual.sum()
        # total == 0 only when p == q, where a rejection has probability zero; guard anyway.
        dist = residual / total if total > 0 else target_probs[n]
    next_token = int(torch.multinomial(dist, 1, generator=generator))
    return n, next_token
