"""KV-cache rollback through the public ``Cache`` API (and, for tree steps, each layer's tensors)."""

from __future__ import annotations

import torch


def truncate_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of a transformers ``Cache`` (drop rejected drafts)."""
    current = cache.get_seq_length()
    if length > current:
        raise ValueError(f"cannot truncate a cache of {current} positions to {length}")
    # crop(0) of a recording sliding-window layer drops what it kept for rollback, back to its window.
    if length < current or _recording(cache):
        # transformers >= 5 takes the number of positions to remove, as a negative int.
        cache.crop(length - current)


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def attention_layers(model) -> list[tuple[str, int | None]]:
    """Each decoder layer's attention type as transformers names it in the model's masks and cache
    (``full_attention``, ``sliding_attention``, ``chunked_attention``, ...) and its window (or
    chunk) in tokens, None for full attention."""
    config = model.config.get_text_config(decoder=True)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # an older transformers 5: the config's layer types, else one type for all layers
        window, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
        default = "sliding_attention" if window else "chunked_attention" if chunk else "full_attention"
        types = getattr(config, "layer_types", None) or [default] * config.num_hidden_layers
        return [(t, window if t == "sliding_attention" else chunk if t == "chunked_attention" else None) for t in types]
    types, kwargs = get_layer_types_and_kwargs(config)
    return [(t, kw.get("sliding_window")) for t, kw in zip(types, kwargs)]


def can_record_past() -> bool:
    """Whether this transformers can keep a sliding-window cache's dropped positions until the next
    crop (``activate_past_recording``), which rolling one back past its window needs."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    return callable(getattr(DynamicSlidingWindowLayer, "activate_past_recording", None))


def record_for_rollback(cache) -> None:
    """Make sliding-window layers keep every position until the next crop instead of dropping the
    oldest at once, so a verify forward's rejected rows can be taken back past the window (what
    transformers' own assisted decoding does). Call it after the prefill (it would keep the whole
    prompt) and before each verify forward; ``truncate_cache`` then trims back to the window.
    Only plain sliding layers: a recording linear-attention (or hybrid) layer would crop its conv
    state but not its recurrent state, where a crop that raises is the safer failure."""
    if can_record_past():
        from transformers.cache_utils import DynamicSlidingWindowLayer

        for layer in cache.layers:
            if type(layer) is DynamicSlidingWindowLayer:
                layer.activate_past_recording()


def _recording(cache) -> bool:
    return any(getattr(layer, "record_past", False) for layer in cache.layers)


def cache_kwargs(model, cache) -> dict:
    """The forward() keyword for a cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def no_router_outputs(model) -> dict:
    """``output_router_logits=False`` for a mixture-of-experts model that can return its router
    logits (Qwen3-MoE, gpt-oss, Mixtral), else nothing. A config that asks for them (kept from
    training with the load-balancing loss) makes every forward compute that loss, which reads the
    attention mask as 2D padding over the whole sequence: it fails on a tree step's 4D mask and,
    in transformers' own batched ``generate``, on every step after the prefill. Decoding and
    self-distillation read neither the router logits nor the loss."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"output_router_logits": False} if "output_router_logits" in params else {}


def keep_positions(cache, start: int, indices) -> None:
    """Keep the first ``start`` positions and, after them, the positions ``start + i`` for ``i`` in
    ``indices`` (ascending), moved into consecutive positions; drop everything else.

    After a tree verify step the cache holds the past, the root (the pending token) and every
    tree node; this keeps the past, the root (index 0) and the accepted path's nodes (index
    node + 1), so the cache again holds one sequence. It gathers each layer's keys and values
    (``cache.layers[i].keys / .values`` of a transformers 5 ``DynamicCache``, sequence dim -2)
    and then truncates. Indices must be ascending and unique, which a root-to-node path is.

    A sliding-window layer holds only its last positions; it works when it holds every position
    from ``start`` on, which a layer recording for rollback (``record_for_rollback``) does after a
    forward. The truncation then trims it back to its window.
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
            # The layer holds positions first .. current - 1 (first > 0 for a sliding-window layer).
            first = None if layer.keys is None else layer.get_seq_length() - layer.keys.shape[-2]
            if first is None or layer.get_seq_length() != current or first > start:
                raise NotImplementedError(
                    f"keep_positions needs every layer to hold positions {start} to {current - 1} "
                    "(a sliding-window layer must record for rollback; no static layers)"
                )
            at = start - first
            idx = torch.tensor(indices, device=layer.keys.device) + at
            # In place, so the past is not copied. Advanced indexing on the right copies first, so
            # overlapping source and target are safe. inference_mode: the engine's cache tensors
            # are inference tensors, which may only be updated in place inside it.
            with torch.inference_mode():
                layer.keys[..., at : at + m, :] = layer.keys[..., idx, :]
                layer.values[..., at : at + m, :] = layer.values[..., idx, :]
    truncate_cache(cache, start + m)
