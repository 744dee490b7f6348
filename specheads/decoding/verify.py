"""Verification rules: which drafted tokens to keep, and the verifier's own next token.

Pure functions over one verify step, named as in the papers. Terms (as in vLLM's rejection
sampler): a drafted token is *accepted* when the rule keeps it; at the first rejection the
verifier emits a *recovered* token drawn from the residual distribution; when every draft is
accepted it emits a *bonus* token from its distribution after the last draft. Either way each
step emits ``n_accepted + 1`` tokens.
"""

from __future__ import annotations

import torch

from .tree import tree_children


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


# --------------------------------------------------------------------------------------------
# Trees. Row 0 of the verifier's output scores the token after the root (the pending token);
# row i + 1 the token after candidate node i. A step accepts a root-to-node path of nodes and
# emits their tokens plus the verifier's own next token.


def greedy_verify_tree(target_logits: torch.Tensor, candidates) -> tuple[list[int], int]:
    """Temperature 0 over a tree (Medusa's and SpecInfer's greedy tree verification).

    From the root, take the verifier's argmax at the current row and move to the child whose
    token equals it (the first such child, if tokens repeat); stop when no child matches. Every
    accepted token is the verifier's own argmax, so the output is exactly greedy decoding.

    target_logits: [1 + n, V]. candidates: a ``Candidates`` tree of n nodes.
    Returns (accepted_path, next_token): the accepted node indices from the root down, and the
    verifier's argmax at the last accepted row.
    """
    target = target_logits.argmax(-1).tolist()  # one host sync for the whole step
    tokens = candidates.tokens.tolist()
    children = tree_children(candidates.parents)
    path: list[int] = []
    row = 0
    while True:
        want = target[row]
        nxt = next((c for c in children[row] if tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        row = nxt + 1


def tree_speculative_sampling(
    target_probs: torch.Tensor,
    candidates,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Multi-candidate recursive rejection sampling over a tree (SpecInfer's multi-step
    speculative sampling, Miao et al. 2024; the rule EAGLE uses), lossless for any drafter.

    At the current node, with residual distribution p (first the verifier's distribution at
    that node's row), the children are tried in order:

    * deterministic drafts (``candidates.draft_probs is None``, q one-hot on each child's token):
      child token x is accepted with probability p(x); on rejection p <- normalise(p with
      p(x) = 0). A child whose token was already rejected here has p(x) = 0, so it is skipped.
    * drafts with probabilities (``draft_probs[c]`` = q_c, the distribution child c's token was
      drawn from, given the siblings drawn before it): x is accepted with probability
      min(1, p(x) / q_c(x)); on rejection p <- normalise(max(0, p - q_c)). A repeated token is
      then rejected with certainty (p(x) = 0 after x was rejected), but the residual update
      still applies: skipping the child because of its drawn value would bias the output.

    An accepted child becomes the current node, with p = the verifier's distribution at its row;
    when no child is accepted, the next token is drawn from the residual p and the step ends.

    Lossless: each trial is one step of standard speculative sampling (Leviathan et al. 2023)
    against the current residual, whose output follows that residual exactly, so by induction
    over the trials (and the depth) every emitted token follows the verifier's distribution,
    p(x1) p(x2 | x1) ... , whatever the tree and the drafter.

    target_probs: [1 + n, V] verifier probabilities (already warped). candidates: a
    ``Candidates`` tree of n nodes. Returns (accepted_path, next_token) as ``greedy_verify_tree``.
    """
    n = len(candidates)
    device = target_probs.device
    tokens_t = candidates.tokens.to(device)
    tokens = candidates.tokens.tolist()
    children = tree_children(candidates.parents)
    u = torch.rand(n, device=device, generator=generator).tolist() if n else []
    path: list[int] = []
    row = 0
    if candidates.draft_probs is None:
        # q one-hot: the residual after rejecting tokens R is p with R zeroed, renormalised, so
        # acceptance needs only p at the children's tokens: one gather and one host sync.
        rows = candidates.parents.to(device) + 1
        p_child = target_probs[rows, tokens_t].tolist() if n else []
        row_mass = target_probs.sum(-1).tolist()  # ~1; kept exact against float drift
        while True:
            remaining = row_mass[row]
            rejected: list[int] = []
            accepted = None
            for c in children[row]:
                if tokens[c] in rejected:
                    continue
                # accept with p_res(x) = p(x) / remaining
                if u[c] * remaining < p_child[c]:
                    accepted = c
                    break
                rejected.append(tokens[c])
                remaining -= p_child[c]
            if accepted is None:
                dist = target_probs[row]
                if rejected:
                    dist = dist.clone()
                    dist[torch.tensor(rejected, device=device)] = 0
                    if not bool(dist.sum() > 0):  # only when p(x) = 1 was rejected: impossible, but guard
                        dist = target_probs[row]
                return path, int(torch.multinomial(dist, 1, generator=generator))
            path.append(accepted)
            row = accepted + 1
    draft_probs = candidates.draft_probs.to(device=device, dtype=target_probs.dtype)
    while True:
        p = target_probs[row]
        accepted = None
        for c in children[row]:
            x = tokens[c]
            q = draft_probs[c]
            p_x, q_x = float(p[x]), float(q[x])
            if u[c] * q_x < p_x:  # u < p(x) / q(x), without dividing by a zero q
                accepted = c
                break
            residual = (p - q).clamp_min(0)
            total = residual.sum()
            # total == 0 only when p == q, where a rejection has probability zero; guard anyway.
            p = residual / total if bool(total > 0) else p
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        row = accepted + 1


def typical_acceptance(
    target_probs: torch.Tensor,
    candidates,
    generator: torch.Generator | None = None,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
) -> tuple[list[int], int]:
    """LOSSY: Medusa's typical acceptance (Cai et al. 2024), an opt-in that trades exactness for τ.

    A candidate token x at a node is acceptable when p(x) > min(threshold, alpha * exp(-H(p))),
    with p the verifier's (warped) distribution at that node. From the root, the walk follows the
    acceptable child with the highest p(x); the next token is sampled from p at the last node.
    The output does NOT follow the verifier's distribution exactly; never the default.
    """
    probs = target_probs.float()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    floor = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))
    children = tree_children(candidates.parents)
    tokens = candidates.tokens.tolist()
    p_rows = probs.cpu()
    floor = floor.tolist()
    path: list[int] = []
    row = 0
    while True:
        best, best_p = None, -1.0
        for c in children[row]:
            p = float(p_rows[row, tokens[c]])
            if p > floor[row] and p > best_p:
                best, best_p = c, p
        if best is None:
            break
        path.append(best)
        row = best + 1
    next_token = int(torch.multinomial(target_probs[row], 1, generator=generator))
    return path, next_token
