"""KV-cache rollback through the public ``Cache`` API."""

from __future__ import annotations


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


def cache_kwargs(model, cache) -> dict:
    """The forward() keyword for a cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}
