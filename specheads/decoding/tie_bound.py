"""How far a verify forward over q tokens moves the verifier's logits from plain decoding's
1-token forwards: the bound under which a difference from plain decoding is a numerical tie.

Greedy speculative decoding is exact in exact arithmetic. In reduced precision a forward over q
tokens (a chain or tree verify step) rounds differently from q forwards of one token (plain
decoding), and so does every key and value it leaves in the cache, so where plain decoding's
top-1 and top-2 logits were nearly equal the two can pick different tokens. What decides such a
flip is the change of the top-1 minus top-2 gap, so that is what ``measure_tie_bound`` measures:
it decodes a few prompts plainly (recording each new token's gap), then again through the engine
with a drafter that replays plain decoding's own tokens, so that every draft is accepted and every
position is computed inside a q-token forward, for chains of q = 2 .. 64 tokens and trees of a
few levels, and takes the largest change of the gap at any position (where a replay flipped a
token, the change needed to flip it; the replay then goes on from plain decoding's token, with
plain decoding's tokens so far as its prompt). The bound is ``SAFETY`` times that.

Logit differences do not depend on the machine's load, only on the model, dtype, threads,
linears and device, so the bound is stored always (``tie_bound.json`` in the specheads cache,
keyed like ``verify_cost.json``). ``specheads.bench`` classifies differences by it; float32's
comes out near float32 noise, so float32 outputs are still held to exact.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import SpecHeadsError
from ..machine_store import measured_once, stored_entry
from .candidates import Candidates, DraftContext

STORE = "tie_bound.json"
SAFETY = 2.0  # the bound over the largest change measured: a few prompts see a few hundred positions
CHAINS = (2, 4, 8, 16, 32, 64)  # verify forwards of q tokens: the pending token and q - 1 drafts
TREE_DEPTHS = (3, 8)  # trees of two nodes per level (q = 2 * depth + 1): the tree-masked forward
NUM_PROMPTS = 3
NEW_TOKENS = 64
# What a benchmark measures when none is stored: one prompt, fewer sizes (about 60 forwards, a few
# seconds for SmolLM2 on a CPU). `specheads calibrate` measures the full set again.
QUICK = {"num_prompts": 1, "new_tokens": 32, "chains": (2, 8, 64), "tree_depths": (3,)}
FORMAT = 1  # the stored entry's layout


class ReplayDrafter:
    """Drafts plain decoding's own continuation (``reference``, the new tokens), so the verifier
    accepts every draft: as a chain, or (``tree``) with a wrong sibling before each right node,
    which makes each step a tree-attention forward of 2 x depth + 1 tokens."""

    name = "replay"
    needs_hidden_states = False

    def __init__(self, reference: list[int], vocab_size: int, tree: bool = False):
        self.reference, self.vocab_size, self.tree = list(reference), vocab_size, tree
        self.prompt_len = 0

    def start(self, prompt_ids: list[int]) -> None:
        self.prompt_len = len(prompt_ids)

    def propose(self, ctx: DraftContext) -> Candidates:
        done = len(ctx.tokens) - self.prompt_len
        chain = self.reference[done: done + ctx.num_draft_tokens]
        if not self.tree:
            return Candidates.chain(chain)
        tokens, parents, parent = [], [], -1
        for t in chain:
            tokens += [(t + 1) % self.vocab_size, t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return Candidates(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        pass


def default_prompts(verifier, n: int = NUM_PROMPTS) -> list[list[int]]:
    """The first ``n`` shipped default prompts as the verifier encodes them; random token ids for a
    verifier without a tokenizer (test models)."""
    if getattr(verifier, "tokenizer", None) is not None:
        from ..prompts import load_prompts

        return [verifier.encode(p) for p in load_prompts("default", limit=n)]
    vocab = verifier.model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(vocab, (12,), generator=g).tolist() for _ in range(n)]


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


@torch.inference_mode()
def measure_tie_bound(verifier, prompts: list[list[int]] | None = None, *, num_prompts: int = NUM_PROMPTS, new_tokens: int = NEW_TOKENS,
                      chains=CHAINS, tree_depths=TREE_DEPTHS, safety: float = SAFETY, progress: bool = False) -> dict:
    """Decode ``prompts`` (token ids; default the first ``num_prompts`` of ``default_prompts``)
    plainly for ``new_tokens`` tokens, then through q-token verify forwards (``chains``: q;
    ``tree_depths``: trees of 2 x depth + 1 tokens, where the verifier allows trees), and return
    the record: ``bound`` (``safety`` x ``max_gap_change``), the largest, 99th-percentile and
    median change of the top-2 gap and the largest change of the top-1 logit over all compared
    positions, the median top-1 logit, how many positions were compared and how many replays
    flipped a token."""
    from .engine import SpeculativeDecoder

    if safety < 1 or not math.isfinite(safety):
        raise SpecHeadsError(f"tie bound safety factor must be a number >= 1, got {safety!r}")
    prompts = default_prompts(verifier, num_prompts) if prompts is None else [list(p) for p in prompts]
    if not prompts:
        raise SpecHeadsError("measuring the tie bound needs at least one prompt")
    limit = getattr(verifier, "max_context", None)
    if limit:  # a short context (test models): the prompts' last tokens, and fewer new ones if need be
        new_tokens = min(new_tokens, limit // 2)
        prompts = [p[-(limit - new_tokens):] for p in prompts]
    vocab = verifier.model.get_output_embeddings().weight.shape[0]
    start = time.perf_counter()
    gap_changes, top_changes, top_logits, flips = [], [], [], 0
    configs = [(q, False) for q in chains] + [(2 * d + 1, True) for d in tree_depths]
    for prompt in tqdm(prompts, desc="tie bound: prompts", disable=not progress):
        # no EOS: every prompt gives new_tokens positions
        plain = SpeculativeDecoder(verifier, None).generate(prompt, max_new_tokens=new_tokens, eos_token_ids=[], record_margins=True)
        ref, gaps, tops = plain.token_ids, plain.margins, plain.top_logits
        top_logits += tops
        for q, tree in configs:
            done = 0  # new tokens of plain decoding compared so far
            while done < len(ref):
                replay = ReplayDrafter(ref[done:], vocab, tree)
                decoder = SpeculativeDecoder(verifier, replay, num_draft_tokens=(q - 1) // 2 if tree else q - 1, control="fixed")
                if tree and decoder._no_trees:  # a verifier that verifies chains only
                    break
                out = decoder.generate(prompt + ref[:done], max_new_tokens=len(ref) - done, eos_token_ids=[], record_margins=True)
                same = next((j for j, (a, b) in enumerate(zip(out.token_ids, ref[done:])) if a != b), len(ref) - done)
                # Up to a flip both runs chose the same token from the same context: the gap is the
                # same function of the logits in both, and its change is what a flip needs.
                gap_changes += [abs(a - b) for a, b in zip(out.margins[:same], gaps[done:done + same])]
                top_changes += [abs(a - b) for a, b in zip(out.top_logits[:same], tops[done:done + same])]
                done += same
                if done < len(ref):
                    # A flip: plain's token lost by at least the replay's own gap, so the gap of
                    # plain's token moved by at least plain's gap plus that. The replay goes on
                    # from plain's token (its prompt now ends there: one long forward over it).
                    flips += 1
                    gap_changes.append(gaps[done] + out.margins[same])
                    done += 1
    largest = max(gap_changes, default=0.0)
    return {
        "bound": safety * largest,
        "max_gap_change": largest,
        "p99_gap_change": _quantile(gap_changes, 0.99),
        "median_gap_change": _quantile(gap_changes, 0.5),
        "max_top_logit_change": max(top_changes, default=0.0),
        "median_top_logit": _quantile(top_logits, 0.5),  # where the ulps rule would put its bound
        "positions": len(gap_changes),
        "flips": flips,
        "safety": safety,
        "q": sorted({q for q, _ in configs}),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "dtype": str(verifier.dtype).replace("torch.", ""),
        "seconds": round(time.perf_counter() - start, 1),
        "format": FORMAT,
    }


def _check_entry(entry) -> str | None:
    """What is wrong with a stored bound (None: usable)."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return "not a tie bound of this specheads' format"
    bound = entry.get("bound")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound < 0:
        return f"bound {bound!r} is not a number >= 0"
    return None


def _store(store) -> Path:
    from ..verifier import cache_dir

    return Path(store) if store is not None else cache_dir() / STORE


def stored_tie_bound(verifier, *, store=None) -> dict | None:
    """The bound stored for this verifier as it runs here (model, dtype, threads, linears, device), or None."""
    from .cost import device_key

    entry = stored_entry(_store(store), device_key(verifier.model), _check_entry)
    return None if entry is None else dict(entry, source="stored")


def tie_bound_for(verifier, *, store=None, remeasure: bool = False, prompts=None, quiet: bool = False, **options) -> dict:
    """This verifier's tie bound: the stored one (``source`` 'stored'), or measured now and stored
    (``source`` 'measured'). ``options``: ``measure_tie_bound``'s."""
    from .cost import device_key

    path = _store(store)

    def measure():
        if not quiet:
            print(f"[specheads] measuring how far q-token verify forwards move the logits from 1-token ones in "
                  f"{str(verifier.dtype).replace('torch.', '')} (the bound for telling numerical ties from mismatches; "
                  f"kept per model, dtype, threads and device in {path})", file=sys.stderr, flush=True)
        return measure_tie_bound(verifier, prompts, **options), None  # logit differences do not depend on load

    entry, reused = measured_once(path, device_key(verifier.model), measure, refresh=remeasure, check=_check_entry,
                                  what="tie bound")
    return dict(entry, source="stored" if reused else "measured")


def describe(entry: dict) -> str:
    """One line: the bound and how it was found."""
    return (f"{entry['bound']:.3g} = {entry['safety']:g} x the largest change of the top-2 logit gap between q-token and "
            f"1-token forwards ({entry['max_gap_change']:.3g}; 99th percentile {entry['p99_gap_change']:.3g}; "
            f"{entry['positions']} positions, q = {', '.join(map(str, entry['q']))}, {entry['dtype']}; {entry['source']})")
