"""A small causal LM with the verifier's vocabulary drafts autoregressively (Leviathan et al.).

It keeps its own KV cache. Between steps the cache is synchronised with the accepted tokens by
their longest common prefix, so rejected drafts are cropped and only new tokens are run.

With a draft vocabulary (``draft_vocab``: token ids, see ``specheads.draft_vocab``) the model's
LM head scores only those tokens: its body runs as usual, and the last hidden state meets the
head's rows for those ids, cut once. Drafts then never leave that set, and the sampling
distribution q is the model's, renormalised over it, which is exactly what the rejection rule is
given: the output stays the verifier's, in distribution and at T = 0 token for token.
"""

from __future__ import annotations

import torch

from ..decoding.candidates import Candidates
from ..decoding.kv_cache import cache_kwargs, new_cache, record_for_rollback, truncate_cache
from ..decoding.sampling import draw
from ..errors import SpecHeadsError
from .base import DraftContext


def _output_vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class DraftModelDrafter:
    name = "draft_model"
    needs_hidden_states = False

    def __init__(self, model, verifier_vocab_size: int, model_name: str = "draft model", draft_vocab: list[int] | None = None):
        vocab = _output_vocab(model)
        if vocab != verifier_vocab_size:
            raise SpecHeadsError(
                f"{model_name} has vocabulary size {vocab} but the verifier has {verifier_vocab_size}: "
                "a draft model must share the verifier's tokenizer and vocabulary"
            )
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.vocab_size = vocab
        self._cache = None
        self._cached: list[int] = []  # tokens whose keys/values are in self._cache
        self.draft_vocab = None
        if draft_vocab is not None:
            self._cut_head(draft_vocab, model_name)

    @property
    def detail(self) -> str:
        return "full vocabulary" if self.draft_vocab is None else f"draft vocabulary of {len(self.draft_vocab)} tokens"

    def _cut_head(self, ids: list[int], model_name: str) -> None:
        head = self.model.get_output_embeddings()
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.vocab_size:
            raise SpecHeadsError(f"draft vocabulary for {model_name}: need distinct token ids in [0, {self.vocab_size}), got {len(ids)} ids")
        self.draft_vocab = torch.tensor(ids, device=head.weight.device)
        self._rows = head.weight[self.draft_vocab].detach().clone()
        self._bias = None if getattr(head, "bias", None) is None else head.bias[self.draft_vocab].detach().clone()
        # The body's last hidden state times the head's rows must be the model's own logits: true
        # for plain LM heads, not for models that rescale or soft-cap logits after the head.
        probe = torch.tensor([[ids[0], ids[-1], ids[len(ids) // 2]]], device=head.weight.device)
        with torch.inference_mode():
            full = self.model(input_ids=probe, use_cache=False).logits[0][:, self.draft_vocab]
            cut = self._head(self.model.base_model(input_ids=probe, use_cache=False).last_hidden_state[0])
        if not torch.allclose(full.float(), cut.float(), rtol=1e-3, atol=1e-3 * float(full.abs().max()) + 1e-5):
            raise SpecHeadsError(
                f"{model_name} ({type(self.model).__name__}) transforms its logits after the LM head; "
                "a draft vocabulary is not supported for it (leave --draft-vocab at 0)"
            )

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self._rows.T
        return logits if self._bias is None else logits + self._bias

    def start(self, prompt_ids: list[int]) -> None:
        self._cache = new_cache(self.model)
        self._cache_kw = cache_kwargs(self.model, self._cache)
        self._cached = []

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Logits [V] after ``ids``; with a draft vocabulary, -inf outside it."""
        device = self.model.get_output_embeddings().weight.device
        input_ids = torch.tensor([ids], device=device)
        if self.draft_vocab is None:
            logits = self.model(input_ids=input_ids, **self._cache_kw, use_cache=True, logits_to_keep=1).logits[0, -1]
        else:
            hidden = self.model.base_model(input_ids=input_ids, **self._cache_kw, use_cache=True).last_hidden_state[0, -1]
            logits = torch.full((self.vocab_size,), float("-inf"), device=device, dtype=hidden.dtype)
            logits[self.draft_vocab] = self._head(hidden)
        self._cached.extend(ids)
        return logits

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
        # The draft rows below are cropped at the next proposal when rejected: a sliding-window
        # draft model (gpt-oss, Mistral) must keep what they push out of its window until then.
        record_for_rollback(self._cache)
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        scores: list[float] = []  # the draft's probability of each token: goodput control's confidence
        for i in range(k):
            if i and ctx.keep_going is not None and not ctx.keep_going(i + 1, [scores]):
                break
            token, q = draw(logits, ctx.sampling, ctx.generator)
            if q is not None:
                probs.append(q)
                scores.append(float(q[token]))
            else:
                scores.append(float(torch.softmax(logits.float(), -1)[token]))
            drafts.append(token)
            ctx.levels_drafted = i + 1
            if i + 1 < k:
                logits = self._forward([token])
        return Candidates.chain(drafts, torch.stack(probs) if probs else None, scores=scores)

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        pass  # the next propose() re-synchronises the cache by common prefix
