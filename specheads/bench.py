"""The benchmark: every method on the same prompts, in one run, side by side.

Methods: ``plain`` (plain decoding through the engine: the baseline every speedup is relative to),
``hf_generate`` (Hugging Face ``generate``), ``hf_assisted`` / ``hf_prompt_lookup`` (Hugging Face
assisted generation with the same draft model / n-gram size, where the drafter allows it) and
``speculative`` (the engine with the drafter; one per draft length and drafter variant, such as
a Medusa tree shape, when several are swept). Several drafters can run side by side
(``BenchDrafter`` entries): their methods are named after them, e.g.
``speculative[medusa:medusa/drafter,tree=chain]`` and ``hf_assisted[draft_model:distill/drafter]``.
After one warm-up prompt, prompts are run in turn and the order of methods rotates per prompt,
so drift in machine speed spreads over all methods alike.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .decoding.engine import SpeculativeDecoder
from .decoding.metrics import DecodingStats
from .decoding.sampling import SamplingParams
from .drafters import DraftModelDrafter, NgramDrafter
from .errors import SpecHeadsError


@dataclass
class MethodResult:
    name: str
    outputs: list[list[int]] = field(default_factory=list)
    time_s: float = 0.0
    new_tokens: int = 0
    stats: DecodingStats | None = None  # engine methods only
    num_draft_tokens: int | None = None  # speculative methods: the draft length swept
    variant: str | None = None  # speculative methods: the drafter variant (e.g. a Medusa tree shape)
    drafter: str | None = None  # the drafter's label when several drafters run side by side
    detail: str | None = None  # speculative methods: what the (variant) drafter's ``detail`` says
    # plain decoding at T=0: per prompt, the top-1 minus top-2 logit and the top-1 logit per new token
    margins: list[list[float]] = field(default_factory=list)
    top_logits: list[list[float]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_s if self.time_s else 0.0


@dataclass
class BenchConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_draft_tokens: tuple[int, ...] = (4,)
    control: str = "goodput"  # the engine's control: goodput or fixed
    typical_acceptance: bool = False  # LOSSY opt-in (sampling only)
    seed: int = 0
    hf_baselines: bool = True
    # Alternative drafters to sweep beside each other (e.g. Medusa tree shapes): label -> drafter.
    # Applies to a lone drafter; each BenchDrafter of a side-by-side run carries its own.
    variants: dict = field(default_factory=dict)


@dataclass
class BenchDrafter:
    """One drafter of a side-by-side run and the variants of it to time (sharing its weights)."""

    drafter: object
    label: str | None = None  # names it in method names; None: the run's only drafter (names as before)
    variants: dict = field(default_factory=dict)  # variant label -> drafter; empty: the drafter itself
    info: dict = field(default_factory=dict)  # more details for the report (e.g. the spec typed, options not swept)


def bench_drafters(drafter, cfg: BenchConfig) -> list[BenchDrafter]:
    """The run's drafters: a list of BenchDrafter as given, or a lone drafter (None: none) with cfg.variants."""
    if drafter is None:
        return []
    if isinstance(drafter, (list, tuple)):
        return list(drafter)
    return [BenchDrafter(drafter, None, dict(cfg.variants))]


def _draft_vocab_size(d):
    """'all', a token count, or None where the drafter kind has no draft vocabulary."""
    if isinstance(d, DraftModelDrafter):
        return "all" if d.draft_vocab is None else len(d.draft_vocab)
    config = getattr(getattr(d, "heads", None), "config", None)
    size = getattr(d, "draft_vocab_size", getattr(config, "draft_vocab_size", False))
    return None if size is False else (size or "all")


def drafter_info(entry: BenchDrafter) -> dict:
    """Kind, tree, draft vocabulary and ``detail`` of one drafter of the run, for the report."""
    d = entry.drafter
    info = {"label": entry.label or d.name, "kind": d.name, "detail": getattr(d, "detail", None)}
    timed = list(entry.variants.values()) or [d]  # the drafters timed: its variants, or itself
    for key, values in (("tree", [getattr(v, "tree", None) for v in timed]), ("draft_vocab", [_draft_vocab_size(v) for v in timed])):
        values = [v if v is None or isinstance(v, (str, int)) else "custom" for v in values]
        if values[0] is not None:
            info[key] = values[0] if len(set(values)) == 1 else values
    if isinstance(d, NgramDrafter):
        info["max_ngram"] = d.max_ngram
    if entry.variants:
        info["variants"] = {label: getattr(v, "detail", None) for label, v in entry.variants.items()}
    info.update(entry.info)
    return info


def _timed_drafter(drafter, cfg: BenchConfig, r: MethodResult):
    """The drafter object a speculative method ran (its variant of its entry), or None."""
    for e in bench_drafters(drafter, cfg):
        if e.label == r.drafter:
            return (e.variants or {None: e.drafter}).get(r.variant)
    return None


def predicted_tau(d, k: int, control: str) -> dict | None:
    """What training predicted for ``d`` at draft length ``k`` (a drafter whose training recorded
    its chain acceptance, ``acceptance_prior``: EAGLE-3), and whether the tau measured is the same
    configuration: only a chain under fixed control verifies k drafts every step, as the prediction
    assumes. None for other drafters."""
    prior = getattr(d, "acceptance_prior", None)
    if not prior or getattr(d, "parts", None):
        return None
    from .training.objectives.eagle3 import predicted_chain_tau

    chain = getattr(d, "tree", "chain") == "chain"
    if chain and control == "fixed":
        compared = f"the same configuration (a chain of {k} drafts, fixed control)"
    else:
        differs = ([] if chain else ["a tree, whose accepted path may leave the top-1 chain (expect more than the chain's)"]) + (
            [] if control == "fixed" else ["goodput control, which verifies fewer drafts where they do not pay (expect less)"])
        compared = ("NOT the same configuration: " + "; ".join(differs)
                    + f"; `--tree chain --control fixed --num-draft-tokens {k}` measures the chain's")
    tau = predicted_chain_tau(prior, k)
    if tau is None:
        compared = f"training evaluated {len(prior)} steps, fewer than k={k}"
    return {"k": k, "tau": tau, "comparable": chain and control == "fixed" and tau is not None, "compared": compared,
            "chain_acceptance": [round(a, 4) for a in prior[:k]]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_generation_config(verifier, cfg: BenchConfig):
    from transformers import GenerationConfig

    s = cfg.sampling
    gen = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=not s.greedy,
        temperature=s.temperature if not s.greedy else None,
        top_k=s.top_k if not s.greedy else None,
        top_p=s.top_p if not s.greedy else None,
        eos_token_id=verifier.eos_token_ids or None,
        pad_token_id=(verifier.eos_token_ids or [0])[0],
    )
    return gen


def build_methods(verifier, drafter, cfg: BenchConfig) -> dict[str, Callable[[list[int], int], tuple]]:
    """name -> run(prompt_ids, seed) returning (new token ids, engine stats or None, the
    GenerationOutput's (margins, top_logits) for plain decoding at T=0, else None).

    ``drafter``: one drafter (or None), swept over ``cfg.variants``, or a list of BenchDrafter."""
    methods: dict[str, Callable] = {}
    entries = bench_drafters(drafter, cfg)

    def engine_method(d, k: int):
        # A drafter that learns across requests (the suffix index) gets its own copy per method:
        # sharing one, a method would draft a prompt from another method's run of the same prompt.
        d = d.fresh() if hasattr(d, "fresh") else d
        decoder = SpeculativeDecoder(
            verifier, d, num_draft_tokens=k, control=cfg.control,
            typical_acceptance={} if cfg.typical_acceptance and d is not None else None,
        )

        # plain decoding's near-ties are what the identity check classifies differences by
        record = d is None and cfg.sampling.greedy

        def run(ids, seed):
            out = decoder.generate(ids, max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, seed=seed, record_margins=record)
            return out.token_ids, out.stats, (out.margins, out.top_logits) if record else None

        run.num_draft_tokens = k if d is not None else None
        run.drafter_object = d
        return run

    methods["plain"] = engine_method(None, 0)
    if cfg.hf_baselines:
        base = _hf_generation_config(verifier, cfg)

        def hf_run(assistant_model=None, **config_overrides):
            gen = copy.deepcopy(base)
            gen.update(**config_overrides)
            extra = {"assistant_model": assistant_model} if assistant_model is not None else {}

            def run(ids, seed):
                torch.manual_seed(seed)
                input_ids = torch.tensor([ids], device=verifier.device)
                out = verifier.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen, **extra)
                return out[0, len(ids) :].tolist(), None, None

            return run

        methods["hf_generate"] = hf_run()
        k_hf = cfg.num_draft_tokens[0]
        for e in entries:
            d, suffix = e.drafter, f"[{e.label}]" if e.label else ""
            if isinstance(d, DraftModelDrafter) and k_hf > 0:
                # HF reads the draft length from the assistant's own generation config. Same fixed
                # length as ours, and no early stop on low draft confidence, for a like-for-like run.
                d.model.generation_config.update(
                    num_assistant_tokens=k_hf, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0
                )
                methods["hf_assisted" + suffix] = hf_run(d.model)
                methods["hf_assisted" + suffix].drafter = e.label
            if isinstance(d, NgramDrafter) and k_hf > 0:
                methods["hf_prompt_lookup" + suffix] = hf_run(prompt_lookup_num_tokens=k_hf, max_matching_ngram_size=d.max_ngram)
                methods["hf_prompt_lookup" + suffix].drafter = e.label
    for e in entries:
        variants = e.variants or {None: e.drafter}
        for label, variant in variants.items():
            for k in cfg.num_draft_tokens:
                tags = [t for t in (e.label, label) if t] + ([f"k={k}"] if len(cfg.num_draft_tokens) > 1 else [])
                name = "speculative" + (f"[{','.join(tags)}]" if tags else "")
                if name in methods:
                    raise SpecHeadsError(f"two benchmark methods would both be named '{name}'")
                methods[name] = engine_method(variant, k)
                methods[name].variant = label
                methods[name].drafter = e.label
                methods[name].detail = getattr(variant, "detail", None)
    return methods


def run_benchmark(verifier, drafter, encoded: list[list[int]], cfg: BenchConfig, *, progress: bool = True) -> dict:
    """Run every method on the prompts (token ids) and return the report dict."""
    if not encoded:
        raise SpecHeadsError("the benchmark needs at least one prompt")
    methods = build_methods(verifier, drafter, cfg)
    results = {
        name: MethodResult(name, num_draft_tokens=getattr(run, "num_draft_tokens", None), variant=getattr(run, "variant", None),
                           drafter=getattr(run, "drafter", None), detail=getattr(run, "detail", None))
        for name, run in methods.items()
    }
    device = verifier.device
    tie = tie_rule(verifier) if cfg.sampling.greedy else None
    # Warm-up: one short run of each method (allocator, kernels, lazy init) that is not counted.
    for run in methods.values():
        run(encoded[0][:64], cfg.seed)
        if hasattr(getattr(run, "drafter_object", None), "clear_history"):
            run.drafter_object.clear_history()  # the warm-up's output must not draft the first prompt's timed run
    names = list(methods)
    for i, ids in enumerate(tqdm(encoded, desc="benchmark prompts", disable=not progress)):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            tokens, stats, margins = methods[name](ids, cfg.seed + i)
            _sync(device)
            elapsed = time.perf_counter() - start
            r = results[name]
            r.outputs.append(tokens)
            r.time_s += elapsed
            r.new_tokens += len(tokens)
            if margins is not None:
                r.margins.append(margins[0])
                r.top_logits.append(margins[1])
            if stats is not None:
                if r.stats is None:
                    r.stats = DecodingStats()
                r.stats.merge(stats)
    return make_report(verifier, drafter, encoded, results, cfg, tie=tie)


def tie_rule(verifier, *, measure: bool | None = None) -> dict:
    """How this run tells numerical ties from mismatches: the bound measured for this verifier as it
    runs here (``decoding.tie_bound``: stored, or measured now when ``measure``, by default in a
    reduced precision), else the ulps rule alone. Returns the stored record plus ``source``, or
    ``{"bound": None, "source": "ulps"}``."""
    from .decoding.tie_bound import QUICK, stored_tie_bound, tie_bound_for

    if measure is None:
        measure = verifier.dtype != torch.float32
    # a quick measurement (a few seconds); `specheads calibrate` stores the full one
    entry = tie_bound_for(verifier, **QUICK) if measure else stored_tie_bound(verifier)
    return entry or {"bound": None, "source": "ulps"}


def describe_tie_rule(tie: dict | None, dtype: str) -> str:
    """The rule in words, e.g. for the report's header line."""
    ulps = f"{TIE_ULPS} ulps of the top-1 logit in {dtype}"
    if not tie or tie.get("bound") is None:
        return f"a difference is a tie where plain decoding's top-2 logit gap there is below {ulps} (no tie bound measured for this verifier)"
    from .decoding.tie_bound import describe

    return f"a difference is a tie where plain decoding's top-2 logit gap there is below {describe(tie)}, or {ulps} if larger"


def make_report(verifier, drafter, encoded, results: dict[str, MethodResult], cfg: BenchConfig, tie: dict | None = None) -> dict:
    """The report dict. ``tie``: ``tie_rule``'s record (None: the ulps rule alone)."""
    plain = results["plain"]
    greedy = cfg.sampling.greedy
    t1 = plain.stats.verify_s / plain.stats.verify_steps if plain.stats and plain.stats.verify_steps else None
    methods = {}
    for name, r in results.items():
        entry = {
            "tokens_per_s": r.tokens_per_s,
            "speedup": r.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else None,
            "tau": r.stats.tau if r.stats else (1.0 if name == "hf_generate" else None),
            "acceptance_per_position": r.stats.acceptance_per_position if r.stats else [],
            "identical_to_verifier": None,
            "identical_fraction": None,
            "new_tokens": r.new_tokens,
            "time_s": r.time_s,
        }
        if greedy:
            # Every method is held to plain decoding's outputs, plain decoding itself to HF generate's.
            reference = results["hf_generate"].outputs if name == "plain" and "hf_generate" in results else plain.outputs
            same = [a == b for a, b in zip(r.outputs, reference)]
            entry["identical_fraction"] = sum(same) / len(same)
            entry["identical_to_verifier"] = all(same)
            entry["first_mismatch_positions"] = [first_difference(a, b) for a, b in zip(r.outputs, reference) if a != b]
            entry.update(classify_differences(r.outputs, reference, plain.margins, plain.top_logits, verifier.dtype,
                                              measured=(tie or {}).get("bound")))
        if r.num_draft_tokens is not None:
            entry["num_draft_tokens"] = r.num_draft_tokens
            prediction = predicted_tau(_timed_drafter(drafter, cfg, r), r.num_draft_tokens, cfg.control)
            if prediction:
                entry["predicted_tau"] = prediction
        for key in ("drafter", "variant", "detail"):
            if getattr(r, key) is not None:
                entry[key] = getattr(r, key)
        if r.stats and r.stats.verify_steps and name != "plain":
            s = r.stats
            step_s = (s.verify_s + s.draft_s) / s.verify_steps
            entry["acceptance_rate"] = s.acceptance_rate
            entry["mean_draft_length"] = s.mean_draft_length
            entry["mean_nodes"] = s.mean_nodes
            entry["plain_steps"] = s.plain_steps
            if s.parts:  # a hybrid: what each part drafted, what of it was accepted, its time
                entry["parts"] = s.parts_report()
            entry["time_per_step_s"] = {"verify": s.verify_s / s.verify_steps, "draft": s.draft_s / s.verify_steps}
            if t1:
                # What this tau could give if nothing but the forwards cost time.
                entry["ceiling_speedup"] = s.tau * t1 / step_s
                entry["efficiency_vs_ceiling"] = entry["speedup"] / entry["ceiling_speedup"] if entry["speedup"] else None
        methods[name] = entry
    if t1:
        methods["plain"]["time_per_step_s"] = {"verify": t1, "draft": 0.0}
    entries = bench_drafters(drafter, cfg)
    lone = len(entries) <= 1 and all(e.label is None for e in entries)
    lone_drafter = entries[0] if entries else None
    return {
        "verifier": verifier.name,
        # a lone drafter: its kind; several side by side: their labels, as the method names use them
        "drafter": (getattr(lone_drafter and lone_drafter.drafter, "name", None) if lone
                    else ", ".join(e.label or e.drafter.name for e in entries)),
        # e.g. the Medusa tree that --tree auto chose; swept variants name theirs in their labels,
        # several drafters theirs under "drafters"
        "drafter_detail": (None if not lone or lone_drafter is None or lone_drafter.variants
                           else getattr(lone_drafter.drafter, "detail", None)),
        "drafters": [drafter_info(e) for e in entries],
        "device": str(verifier.device),
        "dtype": str(verifier.dtype).replace("torch.", ""),
        "dtype_choice": getattr(verifier, "dtype_choice", None),  # e.g. "auto -> bfloat16 (CPU has avx512_bf16)"
        "float32_head": getattr(verifier, "float32_head", None),  # what runs in float32 on a bf16 verifier
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "num_prompts": len(encoded),
        "mean_prompt_tokens": sum(map(len, encoded)) / len(encoded),
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.sampling.temperature,
        "top_k": cfg.sampling.top_k,
        "top_p": cfg.sampling.top_p,
        "num_draft_tokens": list(cfg.num_draft_tokens),
        "control": cfg.control,
        "typical_acceptance_LOSSY": cfg.typical_acceptance,
        # greedy runs: the bound that tells numerical ties from mismatches, and how it was found
        "tie_bound": (dict(tie or {"bound": None, "source": "ulps"}, ulps=TIE_ULPS,
                           rule=describe_tie_rule(tie, str(verifier.dtype).replace("torch.", ""))) if greedy else None),
        "methods": methods,
        "best_draft_length": best_draft_lengths(results, methods),
    }


# A difference from plain decoding is a numerical tie when plain decoding's top-1 minus top-2 logit
# at the first differing token is below the bound measured for this verifier, dtype and machine
# (decoding/tie_bound.py: how far q-token verify forwards move that gap from 1-token ones, with a
# safety factor), or below TIE_ULPS units in the last place of its top-1 logit in the verifier's
# dtype if that is larger (the floor, and the rule alone where no bound was measured). bfloat16
# SmolLM2 moved gaps by far more than 4 ulps (docs/bench.md); float32's measured bound is float32
# noise, so float32 outputs are still held to exact. 4 ulps: bfloat16 at a top logit of 20,
# 4 * 2**-7 * 16 = 0.5; float32, 4 * 2**-23 * 16 = 7.6e-6.
TIE_ULPS = 4


def tie_bound(dtype: torch.dtype, top_logit: float, measured: float | None = None) -> float:
    """The larger of ``measured`` (a measured bound, or None) and TIE_ULPS units in the last place
    of ``top_logit`` in ``dtype`` (eps * 2**floor(log2|top_logit|) each)."""
    finfo = torch.finfo(dtype)
    ulps = TIE_ULPS * finfo.eps * 2.0 ** math.floor(math.log2(max(abs(top_logit), finfo.tiny)))
    return ulps if measured is None else max(ulps, float(measured))


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where two token lists differ (the shorter one's length if one is a prefix of the other)."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def classify_differences(outputs, reference, margins, top_logits, dtype: torch.dtype, measured: float | None = None) -> dict:
    """Each output against its reference: exact, a numerical tie or a mismatch.

    ``margins`` / ``top_logits``: per prompt, plain decoding's top-2 gap and top-1 logit per new
    token (``GenerationOutput.margins``); ``measured``: the verifier's measured tie bound, or None
    (``tie_bound``). Returns ``identity`` ("exact", "ties" when every difference is a tie, else
    "mismatch"), ``identity_counts`` and one entry of ``differences`` per differing output
    (prompt, position, gap, top_logit, bound, tie)."""
    differences = []
    for i, (a, b) in enumerate(zip(outputs, reference)):
        if a == b:
            continue
        j = first_difference(a, b)
        # no margin recorded there (an output that stopped early): nothing excuses the difference
        gap = margins[i][j] if i < len(margins) and j < len(margins[i]) else None
        top = top_logits[i][j] if gap is not None else None
        bound = tie_bound(dtype, top, measured) if top is not None else None
        differences.append({"prompt": i, "position": j, "gap": gap, "top_logit": top, "bound": bound,
                            "tie": gap is not None and gap < bound})
    ties = sum(d["tie"] for d in differences)
    mismatches = len(differences) - ties
    return {
        "identity": "mismatch" if mismatches else "ties" if ties else "exact",
        "identity_counts": {"exact": len(outputs) - len(differences), "ties": ties, "mismatch": mismatches},
        "differences": differences,
    }


def best_draft_lengths(results: dict[str, MethodResult], methods: dict[str, dict]) -> dict[str, dict]:
    """Per drafter variant, the swept draft length with the highest measured speedup."""
    best: dict[str, dict] = {}
    for name, r in results.items():
        speedup = methods[name]["speedup"]
        if r.num_draft_tokens is None or speedup is None:
            continue
        key = ",".join(t for t in (r.drafter, r.variant) if t) or "drafter"
        if key not in best or speedup > best[key]["speedup"]:
            best[key] = {"method": name, "num_draft_tokens": r.num_draft_tokens, "speedup": speedup, "tau": methods[name]["tau"]}
    return best


def _counts(rows: list[int]) -> str:
    """[2, 3, 4, 5, 8] -> '2-5, 8'; [] -> 'no'."""
    if not rows:
        return "no"
    spans, start = [], rows[0]
    for prev, cur in zip(rows, rows[1:] + [None]):
        if cur is None or cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return ", ".join(spans)


def _drafter_line(info: dict) -> str:
    parts = [info["kind"]]
    detail = info.get("detail") if not info.get("variants") else None  # variants name their own
    if detail:
        parts.append(detail)
    if "max_ngram" in info:
        parts.append(f"n-grams up to {info['max_ngram']}")
    if "draft_vocab" in info and "vocabulary" not in (detail or ""):
        vocab = info["draft_vocab"]
        parts.append(f"draft vocabulary {', '.join(map(str, vocab)) if isinstance(vocab, list) else vocab}")
    if info.get("variants"):
        parts.append("variants " + ", ".join(f"{label} ({d})" if d else label for label, d in info["variants"].items()))
    if info.get("not_swept"):
        parts.append("not swept: " + ", ".join(info["not_swept"]))
    where = f" ({info['spec']})" if info.get("spec") and info["spec"] != info["label"] else ""
    return f"- `{info['label']}`{where}: " + "; ".join(parts)


def _markdown_side_by_side(report: dict) -> list[str]:
    """The table of a run with several drafters: drafter x variant per row."""
    lines = [
        f"verifier `{report['verifier']}`, {len(report['drafters'])} drafters side by side, {_precision(report)}, "
        f"{report['torch_threads']} threads, {report['num_prompts']} prompts, {report['max_new_tokens']} new tokens, "
        f"T={report['temperature']}; every method timed alternately with plain decoding on the same prompts",
        "",
        *map(_drafter_line, report["drafters"]),
        "",
    ]
    lines += _cpu_linears_lines(report)
    lines += [
        "| method | drafter | variant | tokens/s | speedup | tau | acceptance per position | identical to verifier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        acc, tau, ident = _cells(m)
        variant = m.get("detail") or m.get("variant")  # e.g. "tree tree4, 4 nodes" for tree=auto:tree4
        if "num_draft_tokens" in m and len(report["num_draft_tokens"]) > 1:
            variant = ", ".join(t for t in (variant, f"k={m['num_draft_tokens']}") if t)
        lines.append(f"| {name} | {m.get('drafter') or '-'} | {variant or '-'} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | "
                     f"{tau} | {acc} | {ident} |")
    return lines + _parts_lines(report)


def _parts_lines(report: dict) -> list[str]:
    """Per part of each hybrid method: the share of steps it ran in, its drafting time, the nodes it
    proposed, of those verified and accepted, and the share of all accepted draft tokens it proposed."""
    rows = [(name, m["parts"]) for name, m in report["methods"].items() if m.get("parts")]
    if not rows:
        return []
    lines = ["", "hybrid parts (share of accepted: of all accepted draft tokens, those the part proposed; a token several "
             "parts proposed counts for each, `alone` for none but this one):", "",
             "| method | part | ran in steps | draft ms per run | proposed | verified | accepted | share of accepted | alone |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, parts in rows:
        for p in parts:
            lines.append(f"| {name} | {p['name']} | {p['run_fraction']:.0%} | {p['draft_ms_per_run']:.2f} | {p['proposed']} | "
                         f"{p['verified']} | {p['accepted']} | {p['accepted_share']:.0%} | {p['accepted_alone_share']:.0%} |")
    return lines


def _precision(report: dict) -> str:
    """What ran, and why: e.g. "cpu bfloat16 (auto -> bfloat16 (CPU has avx512_bf16); LM head's top-16 logits in float32)"."""
    notes = [c for c in [report.get("dtype_choice")] if c and c != report["dtype"]]
    if report.get("float32_head"):
        notes.append(f"{report['float32_head']} in float32")
    return f"{report['device']} {report['dtype']}" + (f" ({'; '.join(notes)})" if notes else "")


def _cpu_linears_lines(report: dict) -> list[str]:
    cpu = report.get("cpu_linears")
    if not (cpu and cpu.get("device") == "cpu"):
        return []
    return [f"CPU linears: LM head streamed for {_counts(cpu['head_rows'])} tokens, other linears for "
            f"{_counts(cpu['layer_rows'])} (torch's packed GEMM otherwise; `--cpu-linears`)", ""]


def _cells(m: dict) -> tuple[str, str, str]:
    """(acceptance per position, tau, identical to verifier) of a method, as table cells."""
    acc = ", ".join(f"{a:.2f}" for a in m["acceptance_per_position"]) or "-"
    tau = f"{m['tau']:.2f}" if m["tau"] is not None else "-"
    ident = {None: "-", "exact": "exact", "ties": f"ties ({m.get('identity_counts', {}).get('ties')})", "mismatch": "mismatch"}[m.get("identity")]
    return acc, tau, ident


def _identity_lines(report: dict) -> list[str]:
    """The tie rule of a greedy run, below its table."""
    tie = report.get("tie_bound")
    return ["", f"identity: {tie['rule']}"] if tie and tie.get("rule") else []


def _best_length_lines(report: dict, *, always_name: bool = False) -> list[str]:
    """The swept draft length that measured fastest, per drafter. Nothing with one length (nothing
    was chosen); under goodput control the swept k is a cap the engine chose below per step, and
    the line says so."""
    best = report.get("best_draft_length") or {}
    if len(report["num_draft_tokens"]) < 2 or not best:
        return []
    goodput = report.get("control") == "goodput"
    lines = [""]
    for key, b in best.items():
        who = f" ({key})" if always_name or key != "drafter" else ""
        lines.append(f"best draft {'length cap' if goodput else 'length'}{who} by measured speedup: k={b['num_draft_tokens']} "
                     f"(`{b['method']}`, {b['speedup']:.2f}x, tau {b['tau']:.2f})")
    if goodput:
        lines.append("(goodput control chose each step's draft length up to the cap)")
    return lines


def _prediction_lines(report: dict) -> list[str]:
    """Training's predicted chain tau beside the tau measured, per method of a drafter that recorded it."""
    rows = [(name, m["predicted_tau"]) for name, m in report["methods"].items() if m.get("predicted_tau")]
    if not rows:
        return []
    lines = ["", "predicted vs measured tau (predicted from training's held-out chain acceptance a_j, `eval/chain_acc_step*`: "
             "tau(k) = 1 + sum over i < k of a_0 x ... x a_i):"]
    for name, p in rows:
        measured = report["methods"][name]["tau"]
        predicted = "-" if p["tau"] is None else f"{p['tau']:.2f}"
        lines.append(f"- `{name}`: predicted chain tau (k={p['k']}) {predicted}, measured tau "
                     f"{'-' if measured is None else f'{measured:.2f}'}: {p['compared']}")
    return lines


def markdown_table(report: dict) -> str:
    if len(report.get("drafters") or []) > 1:
        lines = _markdown_side_by_side(report) + _best_length_lines(report, always_name=True)
        lines += _prediction_lines(report) + _identity_lines(report)
        return "\n".join(lines) + "\n"
    lines = [
        f"verifier `{report['verifier']}`, drafter `{report['drafter']}`"
        + (f" ({report['drafter_detail']})" if report.get("drafter_detail") else "") + f", {_precision(report)}, "
        f"{report['torch_threads']} threads, {report['num_prompts']} prompts, {report['max_new_tokens']} new tokens, "
        f"T={report['temperature']}",
        "",
    ]
    lines += _cpu_linears_lines(report)
    lines += [
        "| method | tokens/s | speedup | tau | acceptance per position | identical to verifier |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        acc, tau, ident = _cells(m)
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | {tau} | {acc} | {ident} |")
    lines += _parts_lines(report) + _best_length_lines(report)
    lines += _prediction_lines(report) + _identity_lines(report)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    tps = [report["methods"][n]["tokens_per_s"] for n in names]
    bars = ax1.bar(range(len(names)), tps, color=["#888" if n == "plain" else "#3a7" for n in names])
    for bar, n in zip(bars, names):
        ax1.annotate(f"{report['methods'][n]['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax1.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax1.set_ylabel("tokens / s")
    ax1.set_title("throughput (speedup over plain)")
    for n in names:
        acc = report["methods"][n]["acceptance_per_position"]
        if acc:
            ax2.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{n} (tau {report['methods'][n]['tau']:.2f})")
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("acceptance")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("acceptance per draft position")
    if ax2.lines:
        ax2.legend()
    fig.suptitle(f"{report['verifier']} / {report['drafter']}, T={report['temperature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, output_dir: str, *, table: Callable[[dict], str] | None = None,
                 plot_fn: Callable[[dict, str], None] | None = None) -> dict[str, str]:
    """report.json, report.md (``table``, by default this module's markdown_table) and report.png
    (``plot_fn``, by default plot) in ``output_dir``."""
    table, plot_fn = table or markdown_table, plot_fn or plot
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, "report.json"),
        "markdown": os.path.join(output_dir, "report.md"),
        "plot": os.path.join(output_dir, "report.png"),
    }
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(table(report))
    plot_fn(report, paths["plot"])
    return paths
