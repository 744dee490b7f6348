"""A small causal LM with the verifier's vocabulary drafts autoregressively (Leviathan et al.).

It keeps its own KV cache. Between steps the cache is synchronised with the accepted tokens by
their longest common prefix, so rejected drafts are cropped and only new tokens are run.
"""

from __future__ import annotations

import torch

from ..decoding.candidates import Candidates
from ..decoding.kv_cache import cache_kwargs, new_cache, truncate_cache
from ..errors import SpecHeadsError
from .base import DraftContext


def _output_vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class DraftModelDrafter:
    name = "draft_model"
    needs_hidden_states = False

    def __init__(self, model, verifier_vocab_size: int, model_name: str = "draft model"):
        vocab = _output_vocab(model)
        if vocab != verifier_vocab_size:
            raise SpecHeadsError(
                f"{model_name} has vocabulary size {vocab} but the verifier has {verifier_vocab_size}: "
                "a draft model must share the verifier's tokenizer and vocabulary"
            )
        self.model = model.eval()
        self.model.requires_grad_(False)
        self._cache = None
        self._cached: list[int] = []  # tokens whose keys/values are in self._cache

    def start(self, prompt_ids: list[int]) -> None:
        self._cache = new_cache(self.model)
        self._cache_kw = cache_kwargs(self.model, self._cache)
        self._cached = []

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        device = self.model.get_output_embeddings().weight.device
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            **self._cache_kw,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cached.extend(ids)
        return out.logits[0, -1]

    def propose(self, ctx: DraftContext) -> Candidates:
        k = ctx.num_draft_tokens
        if k <= 0:
            return Candidates.empty()
        tokens = ctx.tokens
        # Longest common prefix of the cache and the context; keep at least one token to feed.
        common = 0
        limit = min(len(self._cached), len(tokens) - 1)
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        truncate_cache(self._cache, common)
        del self._cached[common:]
        logits = self._forward(tokens[common:])
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if ctx.sampling.greedy:
                token = int(logits.argmax())
            else:
                q = ctx.sampling.probs(logits[None])[0]
                token = int(torch.multinomial(q, 1, generator=ctx.generator))
                probs.append(q)
            drafts.append(token)
            if i + 1 < k:
                logits = self._forward([token])
        return Candidates.chain(drafts, torch.stack(probs) if probs else None)

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        pass  # the next propose() re-synchronises the cache by common prefix
