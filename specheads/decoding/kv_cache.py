"""KV-cache rollback through the public ``Cache`` API (and, for tree steps, each layer's tensors)."""

from __future__ import annotations

import torch


def truncate_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of a transformers ``Cache`` (drop rejected drafts)."""
    current = cache.get_seq_length()
    if length > current:
        raise ValueError(f"cannot truncate a cache of {current} positions to {length}")
    if length < current:
        # transformers >= 5 takes the number of positions to remove, as a negative int.
        cache.crop(length - current)


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def sliding_windows(model) -> list[int]:
    """The window sizes of the cache layers that keep only recent positions (sliding-window attention)."""
    return sorted({layer.sliding_window for layer in new_cache(model).layers if getattr(layer, "is_sliding", False)})


def cache_kwargs(model, cache) -> dict:
    """The forward() keyword for a cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def keep_positions(cache, start: int, indices) -> None:
    """Keep the first ``start`` positions and, after them, the positions ``start + i`` for ``i`` in
    ``indices`` (ascending), moved into consecutive positions; drop everything else.

    After a tree verify step the cache holds the past, the root (the pending token) and every
    tree node; this keeps the past, the root (index 0) and the accepted path's nodes (index
    node + 1), so the cache again holds one sequence. It gathers each layer's keys and values
    (``cache.layers[i].keys / .values`` of a transformers 5 ``DynamicCache``, sequence dim -2)
    and then truncates. Indices must be ascending and unique, which a root-to-node path is.
    """
    indices = [int(i) for i in indices]
    if any(b <= a for a, b in zip(indices, indices[1:])) or (indices and indices[0] < 0):
        raise ValueError(f"indices must be ascending, unique and >= 0: {indices}")
    current = cache.get_seq_length()
    if indices and start + indices[-1] >= current:
        raise ValueError(f"position {start + indices[-1]} is outside the cache of {current} positions")
    m = len(indices)
    if indices != list(range(m)):  # a contiguous prefix (e.g. a chain) needs no move
        for layer in cache.layers:
            if layer.keys is None or layer.keys.shape[-2] != current:
                raise NotImplementedError(
                    "keep_positions needs every layer to hold every position (no sliding-window or static layers)"
                )
            idx = torch.tensor(indices, device=layer.keys.device) + start
            # In place, so the past is not copied. Advanced indexing on the right copies first, so
            # overlapping source and target are safe. inference_mode: the engine's cache tensors
            # are inference tensors, which may only be updated in place inside it.
            with torch.inference_mode():
                layer.keys[..., start : start + m, :] = layer.keys[..., idx, :]
                layer.values[..., start : start + m, :] = layer.values[..., idx, :]
    truncate_cache(cache, start + m)
