"""The speculative decoding loop: draft -> verify in one forward -> accept -> roll back -> repeat.

The engine owns the verifier's KV cache. Invariant between steps: the cache holds every token
except the last (the *pending* token, which the verifier emitted but has not yet run). A verify
step runs the pending token plus the drafted candidates in one forward, keeps the accepted
prefix, crops the rejected positions from the cache, and appends the verifier's own next token,
which becomes the new pending token. With no drafter (or zero drafts) this is plain decoding.

Chains run as a plain causal forward (the fast path). Trees (candidates with branches) run with
tree attention: one forward over the pending token and every node, with a 4D mask that lets each
node see only its ancestors and position ids by depth (``tree.py``); the accepted root-to-node
path is then moved into consecutive cache positions and the rest dropped. For trees the engine's
``k`` is the tree's depth, and the statistics count drafted = the tree's depth and accepted = the
accepted path's length, so ``acceptance_per_position[d]`` is the fraction of steps whose
accepted path reached depth d + 1.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SpecHeadsError
from .candidates import Candidates, DraftContext
from .draft_length import AdaptiveDraftLength, FixedDraftLength
from .kv_cache import cache_kwargs, keep_positions, new_cache, sliding_windows, truncate_cache
from .metrics import DecodingStats
from .sampling import SamplingParams, draw
from .tree import clip_tree_depth, tree_attention_mask, tree_max_depth, tree_position_ids
from .verify import greedy_verify, greedy_verify_tree, speculative_sampling, tree_speculative_sampling, typical_acceptance


# Attention implementations tested with the 4D masks of tree verification (tests/test_tree.py).
TREE_ATTENTION = ("eager", "sdpa")


@dataclass
class GenerationOutput:
    prompt_ids: list[int]
    token_ids: list[int]  # the new tokens only
    finish_reason: str  # "eos" | "length" | "stop_string"
    stats: DecodingStats = field(default_factory=DecodingStats)
    text: str | None = None
    # generate(record_margins=True): per new token, the verifier's top-1 minus top-2 logit at the
    # row it was chosen from, and that top-1 logit (how near a tie the choice was, and at what
    # magnitude: the benchmark tells reduced-precision flips from real mismatches by them)
    margins: list[float] | None = None
    top_logits: list[float] | None = None


class SpeculativeDecoder:
    """Speculative decoding with any ``Drafter`` over a transformers causal LM (batch size 1).

    ``verifier`` is a ``specheads.verifier.Verifier`` (or any object with ``model``,
    ``tokenizer`` and ``eos_token_ids``). ``drafter=None`` gives plain decoding through the same
    loop, which is the fair baseline for speedups.
    """

    def __init__(
        self,
        verifier,
        drafter=None,
        *,
        num_draft_tokens: int = 4,
        adaptive: bool = False,
        typical_acceptance: dict | None = None,
    ):
        """``typical_acceptance``: None (default, lossless) or Medusa's LOSSY typical acceptance
        for sampled decoding, e.g. ``{"posterior_threshold": 0.09, "posterior_alpha": 0.3}``."""
        self.typical = typical_acceptance
        self.verifier = verifier
        self.model = verifier.model
        self.drafter = drafter
        if num_draft_tokens < 0:
            raise SpecHeadsError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        self.num_draft_tokens = num_draft_tokens
        self.adaptive = adaptive
        self._no_trees = self._check_tree_support(drafter) if drafter is not None else None

    def _check_tree_support(self, drafter) -> str | None:
        """Tree steps need a cache whose every layer keeps every position (``keep_positions``) and
        an attention that honours a 4D mask (eager and sdpa are tested with tree masks). A drafter
        that declares ``proposes_trees`` is refused, or the verifier switched to sdpa, here rather
        than at its first tree; for others, the reason a tree step would be refused, or None."""
        trees = bool(getattr(drafter, "proposes_trees", False))
        who = f"verifier '{getattr(self.verifier, 'name', type(self.model).__name__)}'"
        windows = sliding_windows(self.model)
        if windows:
            why = (f"{who} has sliding-window attention (window {windows[0]} tokens), whose cache drops positions that "
                   f"tree verification must keep: drafter '{drafter.name}' proposes candidate trees; use a chain (e.g. --tree chain)")
            if trees:
                raise SpecHeadsError(why)
            return why
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl in TREE_ATTENTION:
            return None
        if not trees:
            return f"{who} uses attention '{impl}', which is not tested with the 4D masks of tree verification (eager, sdpa)"
        try:
            self.model.set_attn_implementation("sdpa")
        except Exception:  # noqa: BLE001  (older or remote-code models): refused just below
            pass
        if getattr(self.model.config, "_attn_implementation", None) not in TREE_ATTENTION:
            raise SpecHeadsError(f"{who} uses attention '{impl}', which tree verification cannot use (it needs eager or sdpa "
                                 f"for its 4D mask), and it cannot be switched to sdpa: load it with attn_implementation='sdpa'")
        warnings.warn(f"{who}: attention '{impl}' switched to 'sdpa' for the candidate trees of drafter '{drafter.name}'", stacklevel=3)
        return None

    # -- validation ---------------------------------------------------------------------------
    def _check(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SpecHeadsError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt_ids) == 0:
            raise SpecHeadsError("empty prompt: it has no tokens")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise SpecHeadsError(f"prompt token ids {bad[:5]} are outside the verifier's vocabulary of {vocab}")
        limit = getattr(self.verifier, "max_context", None)
        if limit and len(prompt_ids) + max_new_tokens > limit:
            raise SpecHeadsError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"verifier's context of {limit} tokens"
            )

    # -- the loop -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
        record_margins: bool = False,
    ) -> GenerationOutput:
        prompt_ids = [int(t) for t in prompt_ids]
        self._check(prompt_ids, max_new_tokens)
        eos = set(self.verifier.eos_token_ids if eos_token_ids is None else eos_token_ids)
        if stop_strings and getattr(self.verifier, "tokenizer", None) is None:
            raise SpecHeadsError("stop_strings need a tokenizer; this verifier has none")
        device = self.model.get_output_embeddings().weight.device
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        drafter = self.drafter
        wants_hidden = bool(drafter is not None and drafter.needs_hidden_states)
        if drafter is None or self.num_draft_tokens == 0:
            controller = FixedDraftLength(0)
        elif self.adaptive:
            controller = AdaptiveDraftLength(self.num_draft_tokens)
        else:
            controller = FixedDraftLength(self.num_draft_tokens)
        stats = DecodingStats()
        start = time.perf_counter()

        # Prefill: run the prompt, emit the first token.
        cache = new_cache(self.model)
        cache_kw = cache_kwargs(self.model, cache)
        out = self.model(
            input_ids=torch.tensor([prompt_ids], device=device),
            **cache_kw,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=wants_hidden,
        )
        first, _ = draw(out.logits[0, -1], sampling, generator)
        margins, top_logits = top2_gaps(out.logits[0, -1:]) if record_margins else (None, None)
        hidden = tuple(h[0] for h in self._declared(out.hidden_states)) if wants_hidden else None
        tokens = prompt_ids + [first]
        new = [first]
        stats.prefill_s = time.perf_counter() - start
        _, finish = self._cut_at_stop([first], [], eos, stop_strings)
        if finish is None and len(new) >= max_new_tokens:
            finish = "length"
        if drafter is not None:
            drafter.start(prompt_ids)

        while finish is None:
            # Never draft past max_new_tokens: a step emits at most k + 1 tokens.
            k = min(controller.choose(), max_new_tokens - len(new) - 1)
            t0 = time.perf_counter()
            if drafter is not None and k > 0:
                # A copy: a drafter that edits ctx.tokens must not change what the engine verifies.
                cands = drafter.propose(DraftContext(list(tokens), k, sampling, generator, hidden))
                cands = _clip(cands, k)
            else:
                cands = Candidates.empty()
            t1 = time.perf_counter()
            step = self._chain_step if cands.is_chain else self._tree_step
            emitted, n_acc, drafted, step_hidden = step(cands, tokens, cache, cache_kw, sampling, generator, device, wants_hidden)
            t2 = time.perf_counter()
            if wants_hidden:
                hidden = step_hidden
            kept, finish = self._cut_at_stop(emitted, new, eos, stop_strings)
            if record_margins:
                gaps, tops = top2_gaps(self._chosen_rows[: len(kept)])
                margins += gaps
                top_logits += tops
            tokens.extend(kept)
            new.extend(kept)
            stats.observe_step(drafted, n_acc, len(kept))
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            controller.update(k, drafted, n_acc, t2 - t1, t1 - t0)
            if drafter is not None:
                drafter.observe(n_acc, kept)
            if finish is None and len(new) >= max_new_tokens:
                finish = "length"

        stats.new_tokens = len(new)
        stats.total_s = time.perf_counter() - start
        text = self.verifier.decode(new) if getattr(self.verifier, "tokenizer", None) is not None else None
        return GenerationOutput(prompt_ids=prompt_ids, token_ids=new, finish_reason=finish, stats=stats, text=text,
                                margins=margins, top_logits=top_logits)

    # -- verify steps -------------------------------------------------------------------------
    def _chain_step(self, cands: Candidates, tokens: list[int], cache, cache_kw, sampling, generator, device, wants_hidden):
        """Verify a chain (or nothing: plain decoding) in one plain causal forward.

        Returns (emitted tokens, number of accepted drafts, number drafted, the hidden states of
        the pending token and accepted drafts for the drafter, or None).
        """
        step_ids = torch.cat([torch.tensor([tokens[-1]]), cands.tokens.cpu()]).to(device)
        out = self.model(input_ids=step_ids[None], **cache_kw, use_cache=True, output_hidden_states=wants_hidden)
        logits = out.logits[0]
        if sampling.greedy:
            n_acc, nxt = greedy_verify(logits, cands.tokens.to(device))
        elif self.typical is not None:
            path, nxt = typical_acceptance(sampling.probs(logits), cands, generator, **self.typical)
            n_acc = len(path)
        else:
            n_acc, nxt = speculative_sampling(
                sampling.probs(logits),
                cands.tokens.to(device),
                None if cands.draft_probs is None else cands.draft_probs.to(device),
                generator,
            )
        self._chosen_rows = logits[: n_acc + 1]  # emitted token i was chosen from row i
        # Roll back: keep the pending token and the accepted drafts.
        truncate_cache(cache, len(tokens) + n_acc)
        emitted = cands.tokens[:n_acc].tolist() + [nxt]
        hidden = tuple(h[0, : n_acc + 1] for h in self._declared(out.hidden_states)) if wants_hidden else None
        return emitted, n_acc, len(cands), hidden

    def _tree_step(self, cands: Candidates, tokens: list[int], cache, cache_kw, sampling, generator, device, wants_hidden):
        """Verify a candidate tree in one forward with tree attention and fix the cache.

        Returns (emitted tokens, number of accepted drafts, the tree's depth, the hidden states of
        [root] + accepted path for the drafter, or None).
        """
        if self._no_trees:  # a drafter that proposes trees without declaring proposes_trees
            raise SpecHeadsError(self._no_trees)
        past_len = len(tokens) - 1  # the cache holds every token but the pending one
        dtype = self.model.get_output_embeddings().weight.dtype
        step_ids = torch.cat([torch.tensor([tokens[-1]]), cands.tokens.cpu()]).to(device)
        parents = cands.parents.cpu()
        out = self.model(
            input_ids=step_ids[None],
            attention_mask=tree_attention_mask(parents, past_len, dtype=dtype, device=device),
            position_ids=tree_position_ids(parents, past_len, device=device),
            **cache_kw,
            use_cache=True,
            output_hidden_states=wants_hidden,
        )
        logits = out.logits[0]
        if sampling.greedy:
            path, nxt = greedy_verify_tree(logits, cands)
        elif self.typical is not None:
            path, nxt = typical_acceptance(sampling.probs(logits), cands, generator, **self.typical)
        else:
            path, nxt = tree_speculative_sampling(sampling.probs(logits), cands, generator)
        # Keep the past, the root (row 0) and the accepted nodes (rows node + 1), consecutively.
        rows = [0] + [i + 1 for i in path]
        self._chosen_rows = logits[rows]  # emitted token i was chosen from row rows[i]
        keep_positions(cache, past_len, rows)
        hidden = None
        if wants_hidden:
            idx = torch.tensor(rows, device=out.hidden_states[0].device)
            hidden = tuple(h[0].index_select(0, idx) for h in self._declared(out.hidden_states))
        emitted = cands.tokens[path].tolist() + [nxt] if path else [nxt]
        return emitted, len(path), tree_max_depth(parents), hidden

    # -- helpers ------------------------------------------------------------------------------
    def _declared(self, hidden_states: tuple) -> tuple:
        """The verifier layers the drafter declares (``hidden_layers``, indices into transformers'
        ``hidden_states``), or all of them for a drafter that declares none."""
        layers = getattr(self.drafter, "hidden_layers", None)
        return hidden_states if layers is None else tuple(hidden_states[i] for i in layers)

    def _cut_at_stop(self, emitted: list[int], new: list[int], eos: set, stop_strings) -> tuple[list[int], str | None]:
        """The emitted tokens up to and including the first eos token or completed stop string,
        and which of the two ended generation (None when neither did)."""
        for i, t in enumerate(emitted):
            if t in eos:
                return emitted[: i + 1], "eos"
            if stop_strings and self._ends_with_stop(new + emitted[: i + 1], stop_strings):
                return emitted[: i + 1], "stop_string"
        return emitted, None

    def _ends_with_stop(self, new: list[int], stop_strings) -> bool:
        # The last token completes a stop string when it appears in the tail's text but did
        # not before that token was added.
        tail_now = self.verifier.tokenizer.decode(new[-32:])
        tail_before = self.verifier.tokenizer.decode(new[-32:-1])
        return any(s in tail_now and s not in tail_before for s in stop_strings)



def top2_gaps(logits: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per row of ``logits`` [rows, vocab]: top-1 minus top-2 logit, and the top-1 logit."""
    top = logits.float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist(), top[:, 0].tolist()


def _clip(cands: Candidates, k: int) -> Candidates:
    """Guard against a drafter returning more than asked (a chain longer than k, or a tree deeper
    than k: its nodes below depth k are dropped)."""
    if len(cands) <= k:
        return cands
    if cands.is_chain:
        probs = None if cands.draft_probs is None else cands.draft_probs[:k]
        return Candidates.chain(cands.tokens[:k], probs)
    keep = clip_tree_depth(cands.parents, k)
    if len(keep) == len(cands):
        return cands
    new_index = {old: new for new, old in enumerate(keep)}
    parents = [-1 if p < 0 else new_index[p] for p in cands.parents[keep].tolist()]
    idx = torch.tensor(keep, dtype=torch.long)
    probs = None if cands.draft_probs is None else cands.draft_probs[idx.to(cands.draft_probs.device)]
    return Candidates(cands.tokens[idx.to(cands.tokens.device)], torch.tensor(parents, dtype=torch.long), probs)
