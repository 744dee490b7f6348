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

What is verified each step is chosen by goodput control (``goodput.py``, the default): the
drafters' proposals (a hybrid drafter's parts, merged into one tree) are cut to the nodes worth
their verify cost on this machine, possibly none, and a drafter that does not pay for its own time
is not run. A hybrid's parts run one at a time, the cheap lookups first, and each costly part only
when it is expected to add more than its drafting time costs beside what the earlier parts
offered. A part that was not run reads, when it next runs, the verifier rows of every step it
missed (an EAGLE-3 drafter's cache then catches up on the accepted tokens). ``control="fixed"``
verifies every proposed node, for experiments.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SpecHeadsError
from .candidates import Candidates, DraftContext
from .goodput import Calibrator, GoodputController, Origin, Selection, merge
from .kv_cache import (attention_layers, cache_kwargs, can_record_past, keep_positions, new_cache, no_router_outputs, record_for_rollback,
                       truncate_cache)
from .metrics import DecodingStats
from .sampling import SamplingParams, draw
from .tree import clip_tree_depth, tree_attention_mask, tree_max_depth, tree_position_ids
from .verify import greedy_verify, greedy_verify_tree, speculative_sampling, tree_speculative_sampling, typical_acceptance


# Attention implementations tested with the 4D masks of tree verification (tests/test_tree.py).
TREE_ATTENTION = ("eager", "sdpa")
CONTROLS = ("goodput", "fixed")
# Layer types whose tree masks _tree_masks builds and whose caches keep_positions rearranges.
TREE_LAYER_TYPES = ("full_attention", "sliding_attention")


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
        control: str = "goodput",
        cost=None,
        typical_acceptance: dict | None = None,
        clock=None,
    ):
        """``num_draft_tokens``: the deepest draft (chain length or tree depth). ``control``:
        ``"goodput"`` (default) lets ``goodput.GoodputController`` choose each step what to verify
        (nothing, a prefix of a chain, the best part of a tree, which drafters of a hybrid run),
        from running acceptance estimates and ``cost``, the verifier's forward cost per token count
        (``cost(q) -> ms``, ``cost.observe(q, seconds)``; by default measured once per machine);
        ``"fixed"`` verifies whatever the drafter proposes at ``num_draft_tokens``, for experiments.
        ``typical_acceptance``: None (default, lossless) or Medusa's LOSSY typical acceptance
        for sampled decoding, e.g. ``{"posterior_threshold": 0.09, "posterior_alpha": 0.3}``.
        ``clock``: seconds, ``time.perf_counter`` by default (tests give drafters a fixed cost)."""
        if control not in CONTROLS:
            raise SpecHeadsError(f"control must be one of {', '.join(CONTROLS)}, got {control!r}")
        self.typical = typical_acceptance
        self.verifier = verifier
        self.model = verifier.model
        self.drafter = drafter
        # A hybrid drafter is several drafters whose candidate trees are merged each step.
        self.parts = [] if drafter is None else list(getattr(drafter, "parts", None) or [drafter])
        # A hybrid's parts by name in its stats (``DecodingStats.parts``); a lone drafter has none.
        self._part_names = list(getattr(drafter, "labels", None) or [p.name for p in self.parts]) if len(self.parts) > 1 else []
        self._clock = clock or time.perf_counter
        if num_draft_tokens < 0:
            raise SpecHeadsError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        self.num_draft_tokens = num_draft_tokens
        self.control = control
        self._cost = cost
        self._calibrator = Calibrator()  # what the drafters' confidence is worth: kept across prompts
        self._layers = attention_layers(self.model)
        self._router_kw = no_router_outputs(self.model)
        self._no_trees = self._check_tree_support(drafter) if drafter is not None else None

    def _check_tree_support(self, drafter) -> str | None:
        """Tree steps need every layer to be full or sliding-window attention (``_tree_masks`` builds
        their masks, ``keep_positions`` moves their keys and values), a transformers that can roll
        a sliding-window cache back (``kv_cache.record_for_rollback``) and an attention that honours
        a 4D mask (eager and sdpa are tested with tree masks). Sliding-window verifiers (Mistral,
        Gemma-2, Gemma-3) verify trees inside and past their window alike, exactly: past it their
        layers still hold every position a tree row may see, and the masks are cut to the window;
        nothing falls back to chains. A drafter that declares ``proposes_trees`` is refused, or the
        verifier switched to sdpa, here rather than at its first tree; for others, the reason a
        tree step would be refused, or None."""
        trees = bool(getattr(drafter, "proposes_trees", False))
        who = f"verifier '{getattr(self.verifier, 'name', type(self.model).__name__)}'"
        use_chain = f"drafter '{drafter.name}' proposes candidate trees; use a chain (e.g. --tree chain)"
        other = [(t, w) for t, w in self._layers if t not in TREE_LAYER_TYPES]
        windows = sorted({w for t, w in self._layers if t == "sliding_attention"})
        why = None
        if other:
            kind, span = other[0]
            span = "" if span is None else f" (chunks of {span} tokens)" if kind == "chunked_attention" else f" (window {span} tokens)"
            why = f"{who} has '{kind}' layers{span}, whose masks or cache tree verification cannot build or rearrange: {use_chain}"
        elif windows and not can_record_past():
            import transformers

            why = (f"{who} has sliding-window attention (window {windows[0]} tokens), and transformers {transformers.__version__} "
                   f"cannot keep the positions a tree step rolls back past the window (no activate_past_recording): {use_chain}")
        if why:
            if trees:
                raise SpecHeadsError(why)
            return why
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl in TREE_ATTENTION:
            return None
        if not trees:
            return f"{who} uses attention '{impl}', which is not tested with the 4D masks of tree verification (eager, sdpa)"
        # sdpa first; eager where the family has no sdpa (gpt-oss: its attention sinks are eager,
        # flash or flex only, and flash or flex take no 4D tree mask)
        for fallback in ("sdpa", "eager"):
            try:
                self.model.set_attn_implementation(fallback)
                break
            except Exception:  # noqa: BLE001  (a family without it, older or remote-code models): refused just below
                pass
        switched = getattr(self.model.config, "_attn_implementation", None)
        if switched not in TREE_ATTENTION:
            raise SpecHeadsError(f"{who} uses attention '{impl}', which tree verification cannot use (it needs eager or sdpa "
                                 f"for its 4D mask), and it cannot be switched to either: load it with attn_implementation='sdpa' "
                                 f"or 'eager'")
        warnings.warn(f"{who}: attention '{impl}' switched to '{switched}' for the candidate trees of drafter '{drafter.name}'", stacklevel=3)
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
        parts = self.parts
        wants_hidden = any(p.needs_hidden_states for p in parts)
        drafting = bool(parts) and self.num_draft_tokens > 0
        controller = None
        if drafting and self.control == "goodput":
            controller = GoodputController(self.cost_curve(), len(parts), calibrator=self._calibrator,
                                           priors=[getattr(p, "acceptance_prior", None) for p in parts])
        stats = DecodingStats()
        start = self._clock()

        # Prefill: run the prompt, emit the first token.
        cache = new_cache(self.model)
        forward_kw = {**cache_kwargs(self.model, cache), **self._router_kw}
        out = self.model(
            input_ids=torch.tensor([prompt_ids], device=device),
            **forward_kw,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=wants_hidden,
        )
        first, _ = draw(out.logits[0, -1], sampling, generator)
        margins, top_logits = top2_gaps(out.logits[0, -1:]) if record_margins else (None, None)
        # Per part, the verifier rows it has not read yet (a part skipped for some steps reads
        # them all at its next proposal).
        backlog = [[] for _ in parts]
        if wants_hidden:
            self._add_hidden(backlog, tuple(h[0] for h in self._declared_all(out.hidden_states)))
        tokens = prompt_ids + [first]
        new = [first]
        stats.prefill_s = self._clock() - start
        _, finish = self._cut_at_stop([first], [], eos, stop_strings)
        if finish is None and len(new) >= max_new_tokens:
            finish = "length"
        for part in parts:
            part.start(prompt_ids)

        clock = self._clock
        while finish is None:
            # Never draft past max_new_tokens: a step emits at most k + 1 tokens.
            k = min(self.num_draft_tokens, max_new_tokens - len(new) - 1) if drafting else 0
            t0 = clock()
            proposals, draft_s, matches = [], {}, {}
            if controller is not None:
                controller.begin()
            # Goodput control considers the parts cheapest first and runs each only if it pays
            # beside what the parts before it proposed; a skipped part's verifier rows wait in its backlog.
            for i in (controller.order() if controller is not None else range(len(parts))) if k > 0 else ():
                if controller is not None and not controller.should_run(i):
                    continue
                ts = clock()
                ctx = DraftContext(list(tokens), k, sampling, generator, self._take_hidden(backlog, i),
                                   keep_going=controller.keep_going(i) if controller is not None else None)
                # A copy of the tokens: a drafter that edits ctx.tokens must not change what the engine verifies.
                proposal = _clip(parts[i].propose(ctx), k)
                draft_s[i], matches[i] = clock() - ts, _match_length(parts[i])
                proposals.append((i, proposal))
                if controller is not None:
                    controller.add(i, proposal, draft_s[i], ctx.levels_drafted, matches[i])
            sel = controller.select() if controller is not None else _unselected(proposals, matches)
            cands = sel.candidates
            t1 = clock()
            step = self._chain_step if cands.is_chain else self._tree_step
            emitted, path, drafted, step_hidden = step(cands, tokens, cache, forward_kw, sampling, generator, device, wants_hidden)
            t2 = clock()
            if controller is not None:
                controller.update(sel, path, t2 - t1)
            if self._part_names:
                stats.observe_parts(self._part_names, {i: len(c) for i, c in proposals}, draft_s,
                                    [[o.source for o in origin] for origin in sel.origins], path)
            if wants_hidden:
                self._add_hidden(backlog, step_hidden)
            kept, finish = self._cut_at_stop(emitted, new, eos, stop_strings)
            if record_margins:
                gaps, tops = top2_gaps(self._chosen_rows[: len(kept)])
                margins += gaps
                top_logits += tops
            tokens.extend(kept)
            new.extend(kept)
            stats.observe_step(drafted, len(path), len(kept), nodes=len(cands))
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            for part in parts:
                part.observe(len(path), kept)
            if finish is None and len(new) >= max_new_tokens:
                finish = "length"

        stats.new_tokens = len(new)
        stats.total_s = self._clock() - start
        text = self.verifier.decode(new) if getattr(self.verifier, "tokenizer", None) is not None else None
        return GenerationOutput(prompt_ids=prompt_ids, token_ids=new, finish_reason=finish, stats=stats, text=text,
                                margins=margins, top_logits=top_logits)

    # -- verify steps -------------------------------------------------------------------------
    def _chain_step(self, cands: Candidates, tokens: list[int], cache, forward_kw, sampling, generator, device, wants_hidden):
        """Verify a chain (or nothing: plain decoding) in one plain causal forward.

        Returns (emitted tokens, the accepted nodes (a prefix), number drafted, the hidden states of
        the pending token and accepted drafts for the drafters, or None).
        """
        step_ids = torch.cat([torch.tensor([tokens[-1]]), cands.tokens.cpu()]).to(device)
        record_for_rollback(cache)
        out = self.model(input_ids=step_ids[None], **forward_kw, use_cache=True, output_hidden_states=wants_hidden)
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
        hidden = tuple(h[0, : n_acc + 1] for h in self._declared_all(out.hidden_states)) if wants_hidden else None
        return emitted, list(range(n_acc)), len(cands), hidden

    def _tree_step(self, cands: Candidates, tokens: list[int], cache, forward_kw, sampling, generator, device, wants_hidden):
        """Verify a candidate tree in one forward with tree attention and fix the cache.

        Returns (emitted tokens, the accepted path's nodes, the tree's depth, the hidden states of
        [root] + accepted path for the drafters, or None).
        """
        if self._no_trees:  # a drafter that proposes trees without declaring proposes_trees
            raise SpecHeadsError(self._no_trees)
        past_len = len(tokens) - 1  # the cache holds every token but the pending one
        dtype = self.model.get_output_embeddings().weight.dtype
        step_ids = torch.cat([torch.tensor([tokens[-1]]), cands.tokens.cpu()]).to(device)
        parents = cands.parents.cpu()
        record_for_rollback(cache)
        out = self.model(
            input_ids=step_ids[None],
            attention_mask=self._tree_masks(parents, past_len, cache, dtype, device),
            position_ids=tree_position_ids(parents, past_len, device=device),
            **forward_kw,
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
            hidden = tuple(h[0].index_select(0, idx) for h in self._declared_all(out.hidden_states))
        emitted = cands.tokens[path].tolist() + [nxt] if path else [nxt]
        return emitted, path, tree_max_depth(parents), hidden

    # -- helpers ------------------------------------------------------------------------------
    def _tree_masks(self, parents, past_len: int, cache, dtype, device):
        """The ``attention_mask`` of a tree verify forward, one per layer type: the tree mask over the
        whole past for full attention; for sliding attention, over the past positions its cache
        layers present (``Cache.get_mask_sizes``: past the window only the last window - 1) and cut
        to the window. One tensor when every layer has the same type; else a dict by layer type,
        which transformers 5 models mixing types (Gemma-2/3: ``causal_mask_mapping``) take instead
        of building their own."""
        masks = {}
        for i, (kind, window) in enumerate(self._layers):
            if kind in masks:
                continue
            if kind != "sliding_attention":
                masks[kind] = tree_attention_mask(parents, past_len, dtype=dtype, device=device)
                continue
            kv_len, kv_offset = cache.get_mask_sizes(len(parents) + 1, i)
            masks[kind] = tree_attention_mask(parents, past_len, dtype=dtype, device=device, window=window, kv_offset=kv_offset)
            if masks[kind].shape[-1] != kv_len:  # a cache layer holding other positions than assumed
                raise RuntimeError(f"layer {i} ({kind}) presents {kv_len} positions, the tree mask covers {masks[kind].shape[-1]}")
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def _hidden_layer_ids(self) -> list[int] | None:
        """The verifier layers any part declares (``hidden_layers``, indices into transformers'
        ``hidden_states``), or None (all of them) when a part declares none."""
        wanted: list[int] = []
        for p in self.parts:
            if not p.needs_hidden_states:
                continue
            layers = getattr(p, "hidden_layers", None)
            if layers is None:
                return None
            wanted += [i for i in layers if i not in wanted]
        return wanted or None

    def _declared_all(self, hidden_states: tuple) -> tuple:
        layers = self._hidden_layer_ids()
        return hidden_states if layers is None else tuple(hidden_states[i] for i in layers)

    def _add_hidden(self, backlog: list[list], rows: tuple) -> None:
        for i, part in enumerate(self.parts):
            if part.needs_hidden_states:
                backlog[i].append(rows)

    def _take_hidden(self, backlog: list[list], i: int):
        """Part i's unread rows, one tensor per layer it declares, and the backlog emptied."""
        part = self.parts[i]
        if not part.needs_hidden_states:
            return None
        rows, backlog[i] = backlog[i], []
        layers = self._hidden_layer_ids()
        mine = getattr(part, "hidden_layers", None)
        pick = list(range(len(rows[0]))) if mine is None or layers is None else [layers.index(l) for l in mine]
        if len(rows) == 1:
            return tuple(rows[0][j] for j in pick)
        return tuple(torch.cat([r[j] for r in rows], 0) for j in pick)

    def cost_curve(self):
        """The verifier's forward cost per token count that goodput control reads: the one given,
        or measured once per machine (cached) and kept for this decoder."""
        if self._cost is None:
            from .cost import verify_cost_curve

            self._cost = verify_cost_curve(self.model)
        return self._cost

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
        from .goodput import subtree

        return subtree(cands, list(range(k)))
    keep = clip_tree_depth(cands.parents, k)
    if len(keep) == len(cands):
        return cands
    from .goodput import subtree

    return subtree(cands, keep)


def _unselected(proposals: list[tuple[int, Candidates]], matches: dict) -> Selection:
    """Fixed control: every proposed node is verified (several parts' trees merged into one)."""
    run = [i for i, _ in proposals]
    proposals = [(i, c) for i, c in proposals if len(c)]
    if not proposals:
        return Selection(Candidates.empty(), [], [], run)
    if len(proposals) == 1:  # verified as proposed (a deterministic tree's repeated sibling tokens too)
        i, cands = proposals[0]
        return Selection(cands, [[Origin(i, 0, None)] for _ in range(len(cands))], [], run)
    if any(c.draft_probs is not None for _, c in proposals):
        raise SpecHeadsError("a hybrid drafter's parts sampled their drafts (draft_probs): sampled candidate sets cannot be merged")
    merged, origins = merge(proposals, matches)
    return Selection(merged, origins, [], run)


def _match_length(drafter) -> int | None:
    """The matched context length behind a lookup drafter's last proposal (``drafter.last``, a
    ``SuffixMatch`` or ``NgramMatch``), None for other drafters or when nothing matched."""
    n = getattr(getattr(drafter, "last", None), "match_length", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None
