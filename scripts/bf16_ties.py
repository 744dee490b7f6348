"""How often bfloat16 speculative decoding differs from bfloat16 plain decoding, with bfloat16
logits, with the default float32 head (its top 16 logits per row in float32), with a float32 copy
of the whole head, and with the final norm in float32 too (docs/bench.md, "bfloat16").

For each MT-Bench first turn: plain decoding and n-gram speculative decoding (T=0), each output
classified against plain's as the benchmark does (exact / numerical tie / mismatch); then, on
one greedy text (plain decoding's without the float32 head, the same for all), how often the
argmax of a one-token forward and of a five-token forward disagree. The verifier is loaded once
per setting, the CPU linears chosen as `specheads bench` does. Counts do not depend on machine
load; the timings do (interleaved, so load drift hits all settings alike, but still rough).

    python scripts/bf16_ties.py --prompts question.jsonl --num-prompts 10 --max-new-tokens 128 --threads 2 \
        --settings "bf16 head,float32 head,float32 copy,float32 norm+copy"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def float32_copy_head(model, rows) -> None:
    """For comparison only: every logit in float32, from a float32 copy of the LM head's weight
    (what the default ``Float32Head`` avoids reading per token)."""
    from specheads.streamed_linear import StreamedLinear

    class Float32CopyHead(StreamedLinear):
        def forward(self, x):
            x = x.float()
            n = x.numel() // x.shape[-1]
            if n not in self.rows:
                return torch.nn.functional.linear(x, self.weight32)
            return (self.weight32 @ x.reshape(n, -1).T).T.reshape(*x.shape[:-1], self.out_features)

    head = model.get_output_embeddings()
    new = Float32CopyHead.wrap(head, rows)
    new.register_buffer("weight32", head.weight.detach().float(), persistent=False)
    model.set_output_embeddings(new)


def float32_norm(model) -> None:
    """For comparison only: the final norm in float32 too (its output, and so the hidden state the
    head reads, stays float32). Llama-style decoders (``norm``)."""
    import copy

    class Float32Norm(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.inner = copy.deepcopy(norm).float()

        def forward(self, x):
            return self.inner(x.float())

    decoder = model.get_decoder()
    decoder.norm = Float32Norm(decoder.norm)


# setting -> what it computes in float32
SETTINGS = {
    "bf16 head": "nothing: logits rounded to bfloat16 (--float32-head off)",
    "float32 head": "the default Float32Head: the top 16 logits of each row",
    "float32 copy": "every logit, from a float32 copy of the LM head",
    "float32 norm+copy": "the final norm, then every logit from a float32 copy of the LM head",
}


def one_vs_five(verifier, prompt: list[int], text: list[int], q: int = 5) -> list[dict]:
    """Teacher-forced over ``text`` after ``prompt``: per position, whether the argmax of a
    one-token forward and of a ``q``-token forward disagree, with the one-token row's top-2 gap."""
    from specheads.decoding.engine import top2_gaps
    from specheads.decoding.kv_cache import cache_kwargs, new_cache

    model = verifier.model
    rows = {}
    with torch.inference_mode():
        for step in (1, q):
            cache = new_cache(model)
            kw = cache_kwargs(model, cache)
            model(input_ids=torch.tensor([prompt]), **kw, use_cache=True, logits_to_keep=1)
            got = []
            for start in range(0, len(text) - 1, step):  # row j predicts text[j + 1]
                got.append(model(input_ids=torch.tensor([text[start : min(start + step, len(text) - 1)]]), **kw, use_cache=True).logits[0])
            rows[step] = torch.cat(got)
    gaps, tops = top2_gaps(rows[1])
    flips = (rows[1].argmax(-1) != rows[q].argmax(-1)).tolist()
    return [{"gap": g, "top_logit": t, "flip": f} for g, t, f in zip(gaps, tops, flips)]


def forward_ms(verifiers: dict, q: int, repeats: int = 30, context: int = 128) -> dict:
    """Median ms of a ``q``-token forward after ``context`` cached tokens, settings interleaved."""
    from specheads.decoding.kv_cache import cache_kwargs, new_cache, truncate_cache

    caches, times = {}, {name: [] for name in verifiers}
    past = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for name, v in verifiers.items():
            caches[name] = new_cache(v.model)
            v.model(input_ids=past, **cache_kwargs(v.model, caches[name]), use_cache=True)
        for _ in range(repeats):
            for name, v in verifiers.items():
                ids = torch.randint(0, 1000, (1, q))
                start = time.perf_counter()
                v.model(input_ids=ids, **cache_kwargs(v.model, caches[name]), use_cache=True)
                times[name].append(time.perf_counter() - start)
                truncate_cache(caches[name], context)
    return {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}


def main(argv=None) -> int:
    from specheads import SpeculativeDecoder, build_drafter, load_verifier
    from specheads.bench import classify_differences
    from specheads.prompts import load_prompts
    from specheads.bench import tie_bound
    from specheads.streamed_linear import machine_key, tune_or_reuse
    from specheads.verifier import cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="default")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-linears", default="tune", choices=["tune", "packed"])
    p.add_argument("--settings", default="bf16 head,float32 head,float32 copy",
                   help="comma list of: " + "; ".join(f"'{k}' ({v})" for k, v in SETTINGS.items()))
    p.add_argument("--output", default="outputs/bf16_ties.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or names[0] != "bf16 head":
        p.error(f"--settings: {unknown or names[0]!r}: a comma list of {', '.join(SETTINGS)}, 'bf16 head' first")
    verifiers, linears = {}, {}
    for name in names:
        v = verifiers[name] = load_verifier("smollm2-135m", dtype="bfloat16", float32_head=name == "float32 head")
        rows = {"head_rows": [], "layer_rows": []}
        if args.cpu_linears == "tune":  # before the comparison heads go in: those are tuned as the bf16 head
            rep = tune_or_reuse(v.model, machine_key(v.model), cache_dir() / "cpu_linears.json")
            rows = {"head_rows": rep["head_rows"], "layer_rows": rep["layer_rows"]}
        linears[name] = rows
        if "copy" in name:
            float32_copy_head(v.model, rows["head_rows"])
        if "norm" in name:
            float32_norm(v.model)
    first = next(iter(verifiers.values()))
    encoded = [first.encode(t) for t in load_prompts(args.prompts, limit=args.num_prompts)]

    decoders = {name: (SpeculativeDecoder(v, None), SpeculativeDecoder(v, build_drafter("ngram", v), num_draft_tokens=args.num_draft_tokens))
                for name, v in verifiers.items()}
    outputs = {name: {"plain": [], "margins": [], "tops": [], "speculative": []} for name in verifiers}
    seconds = {name: {"plain": 0.0, "speculative": 0.0} for name in verifiers}
    for i, ids in enumerate(encoded):
        for name, (plain, spec) in decoders.items():
            out = plain.generate(ids, max_new_tokens=args.max_new_tokens, record_margins=True)
            outputs[name]["plain"].append(out.token_ids)
            outputs[name]["margins"].append(out.margins)
            outputs[name]["tops"].append(out.top_logits)
            seconds[name]["plain"] += out.stats.total_s
            out = spec.generate(ids, max_new_tokens=args.max_new_tokens)
            outputs[name]["speculative"].append(out.token_ids)
            seconds[name]["speculative"] += out.stats.total_s
        print(f"[bf16_ties] prompt {i + 1}/{len(encoded)} decoded", file=sys.stderr, flush=True)

    common = outputs["bf16 head"]["plain"]  # one greedy text for the one-vs-five count of every setting
    result = {"verifier": "smollm2-135m", "dtype": "bfloat16", "num_prompts": len(encoded), "max_new_tokens": args.max_new_tokens,
              "num_draft_tokens": args.num_draft_tokens, "threads": torch.get_num_threads(), "cpu_linears": linears,
              "what_runs_in_float32": {name: SETTINGS[name] for name in names}, "settings": {}}
    for name, v in verifiers.items():
        o = outputs[name]
        ident = classify_differences(o["speculative"], o["plain"], o["margins"], o["tops"], v.dtype)
        rows = [r for ids, text in zip(encoded, common) for r in one_vs_five(v, ids, text)]
        flips = [r for r in rows if r["flip"]]
        tokens = {k: sum(map(len, o[k])) for k in ("plain", "speculative")}
        result["settings"][name] = {
            "identity_counts": ident["identity_counts"],
            "differences": ident["differences"],
            "one_vs_five": {"positions": len(rows), "disagree": len(flips),
                            "gaps": sorted(round(r["gap"], 4) for r in flips),
                            # the largest disagreement's gap in units of the tie bound (below 1: a tie)
                            "max_gap_over_bound": max((r["gap"] / tie_bound(v.dtype, r["top_logit"]) for r in flips), default=None),
                            "exact_top2_ties": sum(r["gap"] == 0 for r in rows)},
            "tokens_per_s_shared_machine": {k: tokens[k] / seconds[name][k] for k in tokens},
        }
        print(f"[bf16_ties] {name}: counted", file=sys.stderr, flush=True)
    result["forward_ms_shared_machine"] = {f"q={q}": forward_ms(verifiers, q) for q in (1, 5)}

    import os

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print("| setting | exact | ties | mismatches | 1- vs 5-token argmax disagreements | largest gap there / tie bound | exact top-2 ties | plain tok/s* | speculative tok/s* |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in result["settings"].items():
        c, o, t = s["identity_counts"], s["one_vs_five"], s["tokens_per_s_shared_machine"]
        worst = "-" if o["max_gap_over_bound"] is None else f"{o['max_gap_over_bound']:.2f}"
        print(f"| {name} | {c['exact']} | {c['ties']} | {c['mismatch']} | {o['disagree']} of {o['positions']} | {worst} | "
              f"{o['exact_top2_ties']} | {t['plain']:.1f} | {t['speculative']:.1f} |")
    print(f"forward ms (median, interleaved): {result['forward_ms_shared_machine']}\n* shared machine: rough\nfull: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
