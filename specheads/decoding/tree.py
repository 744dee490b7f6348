"""Tree attention: verify a whole candidate tree in one forward of the verifier.

The verify forward of a tree step runs q = 1 + n tokens on top of a KV cache of ``past_len``
positions: row 0 is the pending token (the tree's root) and row i + 1 is candidate node i. Each
row may attend to every cached position, to the root, to itself and to its ancestors, and to
nothing else, so it computes exactly what a causal forward over its root-to-node path would.
Its position id is ``past_len + depth`` (the root has depth 0, its children depth 1), which is
the position the token would have in that causal sequence.

The mask goes through the model's public ``forward(attention_mask=...)`` as a 4D tensor of shape
``[1, 1, q, past_len + q]`` (a sliding-window layer past its window holds fewer past positions:
``tree_attention_mask(window=, kv_offset=)``; models mixing layer types take a dict of masks by
layer type, see ``engine._tree_masks``). transformers 5.x (``masking_utils._preprocess_mask_arguments``)
returns any 4D mask as is, without checking or converting it, and hands it to the attention
function of the model's implementation: ``sdpa`` passes it to
``torch.nn.functional.scaled_dot_product_attention`` (which takes a bool or an additive float
mask) but ``eager`` *adds* it to the attention scores, where a bool mask would silently add 0/1.
So the one form both accept is the additive float mask: 0 where a row may attend,
``torch.finfo(dtype).min`` elsewhere, in the model's dtype (sdpa needs the query's dtype).

Nodes are topologically ordered (parent before child), as ``Candidates`` guarantees, so every
helper here is one pass over ``parents``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _as_list(parents) -> list[int]:
    if isinstance(parents, torch.Tensor):
        return [int(p) for p in parents.tolist()]
    return [int(p) for p in parents]


def tree_depths(parents) -> list[int]:
    """Depth of each node: a child of the root (parent -1) has depth 1, its children depth 2, ..."""
    depth: list[int] = []
    for p in _as_list(parents):
        depth.append(1 if p < 0 else depth[p] + 1)
    return depth


def tree_max_depth(parents) -> int:
    """The depth of the deepest node (0 for an empty tree): the most drafts one step can accept."""
    return max(tree_depths(parents), default=0)


def path_to_node(parents, node: int) -> list[int]:
    """The node indices on the path from the root (exclusive) down to ``node`` (inclusive).

    This is the tree's retrieve structure: the tokens ``tokens[path]`` are what the verifier
    accepts when it accepts ``node``, and ``[0] + [i + 1 for i in path]`` are their rows in the
    verify forward (row 0 being the root).
    """
    parents = _as_list(parents)
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def tree_children(parents) -> list[list[int]]:
    """children[r]: the nodes whose parent is row r's token, in node order (row 0 = the root,
    row i + 1 = node i). Verification walks the tree with it."""
    parents = _as_list(parents)
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        children[p + 1].append(i)
    return children


def tree_visibility(parents, device=None) -> torch.Tensor:
    """[q, q] bool, q = 1 + n: entry (r, c) is True when row r sees row c of the verify forward,
    i.e. c is r itself or one of its ancestors (the root, row 0, is an ancestor of every row)."""
    parents = _as_list(parents)
    q = len(parents) + 1
    vis = torch.zeros(q, q, dtype=torch.bool)
    vis[0, 0] = True
    for i, p in enumerate(parents):
        vis[i + 1] = vis[p + 1]  # everything the parent sees (its ancestors, itself) ...
        vis[i + 1, i + 1] = True  # ... and itself
    return vis.to(device) if device is not None else vis


def tree_position_ids(parents, past_len: int, device=None) -> torch.Tensor:
    """[1, q] long position ids: ``past_len`` for the root, ``past_len + depth`` for each node.

    Pass them explicitly: a model left to itself numbers the q rows consecutively, which is right
    for a chain only (models with absolute position embeddings, like GPT-2, read them directly;
    rotary models rotate queries and keys by them).
    """
    pos = [past_len] + [past_len + d for d in tree_depths(parents)]
    return torch.tensor([pos], dtype=torch.long, device=device)


def tree_attention_mask(
    parents, past_len: int, dtype: torch.dtype = torch.float32, device=None, *, window: int | None = None, kv_offset: int = 0
) -> torch.Tensor:
    """The additive 4D attention mask [1, 1, q, past_len - kv_offset + q] for a tree verify forward.

    0 where a row may attend (every cached position, the root, the row itself and its
    ancestors), ``torch.finfo(dtype).min`` elsewhere. ``dtype`` must be the model's compute dtype.

    For a sliding-window layer: its cache presents only positions ``kv_offset .. past_len - 1``
    of the past (the columns before the tree's), and ``window`` cuts each row to the positions
    p > its own position - window, as transformers' sliding mask does for a causal sequence
    (``masking_utils.sliding_window_overlay``); a row's position is ``past_len + depth``.
    """
    vis = tree_visibility(parents)
    q = vis.shape[0]
    allowed = torch.cat([torch.ones(q, past_len - kv_offset, dtype=torch.bool), vis], dim=1)
    if window is not None:
        rows = tree_position_ids(parents, past_len)[0]
        cols = torch.cat([torch.arange(kv_offset, past_len), rows])
        allowed &= cols[None, :] > rows[:, None] - window
    mask = torch.zeros(q, allowed.shape[1], dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device) if device is not None else mask[None, None]


def clip_tree_depth(parents: Sequence[int] | torch.Tensor, max_depth: int) -> list[int]:
    """The indices of the nodes at depth <= ``max_depth`` (in order; a kept node's parent is kept)."""
    return [i for i, d in enumerate(tree_depths(parents)) if d <= max_depth]
