"""DistillSpec comparison table: divergence x data source -> held-out acceptance, tau and speedup.

Each cell trains a draft model with the recipe (``--recipe``, the quick one by default) changed
only in its loss and its data, then benchmarks it with specheads' bench (plain decoding vs the
engine with the student, sweeping the draft length) and keeps the best measured speedup:

    python scripts/distill_table.py --set training.max_steps=40
    python scripts/distill_table.py --losses fkl,tvd --data verifier,on_policy --set training.max_steps=4 \\
        --num-prompts 2 --max-new-tokens 32

Data sources:
  fixed      a fixed conversation dataset that the verifier did not write: offline prompts asking
             what a Python standard-library function or class does, answered by its own docstring
             (human-written reference text). Built into <output>/fixed_conversations.jsonl.
  verifier   the recipe's self-distilled data (the verifier's own answers).
  on_policy  the same prompts, but the student writes the answers itself during training
             (objective.on_policy_fraction, --on-policy-fraction) and the verifier scores them.

Resumable: a cell whose result.json exists is skipped; a cell whose training was interrupted
continues from its latest checkpoint. Writes <output>/table.md and <output>/table.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MT_BENCH = os.path.join(ROOT, "..", "shared", "data", "mt_bench", "question.jsonl")
LOSSES = ("fkl", "rkl", "jsd", "tvd")
DATA = ("fixed", "verifier", "on_policy")
# Modules whose public functions and classes answer the "fixed" prompts with their docstrings.
DOC_MODULES = (
    "json", "os.path", "collections", "itertools", "functools", "re", "string", "textwrap", "math", "statistics",
    "datetime", "pathlib", "random", "heapq", "bisect", "shutil", "csv", "urllib.parse", "difflib", "fractions",
    "decimal", "operator", "inspect", "dataclasses", "enum", "contextlib", "logging", "argparse", "subprocess",
    "threading", "queue", "hashlib", "base64", "zipfile", "tarfile", "uuid", "calendar", "copy", "glob", "fnmatch",
)


def docstring_conversations(limit: int) -> list[dict]:
    """Up to ``limit`` conversations: "What does `mod.name` do?" answered by its docstring."""
    out = []
    for modname in DOC_MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(set(names)):
            obj = getattr(module, name, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
            answer = "\n\n".join(paragraphs[:3])[:1200]
            if len(answer) < 120:  # a signature line or a one-liner is no answer
                continue
            prompt = f"What does `{modname}.{name}` do in Python? Explain it briefly."
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    # Interleave modules so a small limit still covers many of them.
    out.sort(key=lambda r: hashlib.sha1(r["messages"][0]["content"].encode()).hexdigest())
    return out[:limit]


def cell_overrides(loss: str, data: str, args, cell_dir: str) -> list[str]:
    sets = [f"objective.loss={loss}", f"training.output_dir={cell_dir}"]
    if data == "fixed":
        sets += [f"data.conversations={args.fixed_path}", "data.self_distill=null"]
    elif data == "on_policy":
        sets += [f"objective.on_policy_fraction={args.on_policy_fraction}"]
        if args.on_policy_fraction >= 1:
            sets.append("training.cache_hidden_states=false")  # nothing is reused: every answer is new
    return sets + list(args.set)


def last_eval(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "training_summary.json")) as f:
        summary = json.load(f)
    evals = [h for h in summary["history"] if "eval/top1_agreement" in h]
    return {"train_seconds": summary["train_seconds"], "steps": summary["steps"], **(evals[-1] if evals else {})}


def run_cell(loss: str, data: str, args, verifier, encoded) -> dict:
    from specheads.bench import BenchConfig, run_benchmark, write_report
    from specheads.cli import _parse_draft_lengths
    from specheads.drafters import build_drafter
    from specheads.training.loop import train
    from specheads.training.recipe import load_recipe

    cell_dir = os.path.join(args.output, "cells", f"{loss}-{data}")
    recipe = load_recipe(args.recipe, cell_overrides(loss, data, args, cell_dir))
    final = os.path.join(cell_dir, "drafter")
    if not os.path.isfile(os.path.join(final, "model.safetensors")):
        train(recipe, resume=True, verifier=verifier, progress=not args.quiet)
    result = {"loss": loss, "data": data, **last_eval(cell_dir)}
    if not args.no_bench:
        cfg = BenchConfig(max_new_tokens=args.max_new_tokens, num_draft_tokens=_parse_draft_lengths(args.num_draft_tokens),
                          hf_baselines=False, seed=recipe.training.seed)
        report = run_benchmark(verifier, build_drafter(final, verifier), encoded, cfg, progress=not args.quiet)
        write_report(report, os.path.join(cell_dir, "bench"))
        best = report["best_draft_length"]["drafter"]
        result.update({
            "best_k": best["num_draft_tokens"], "tau": best["tau"], "speedup": best["speedup"],
            "tokens_per_s": report["methods"][best["method"]]["tokens_per_s"],
            "plain_tokens_per_s": report["methods"]["plain"]["tokens_per_s"],
            "by_k": {m["num_draft_tokens"]: {"tau": m["tau"], "speedup": m["speedup"]}
                     for m in report["methods"].values() if "num_draft_tokens" in m},
            "identical_to_verifier": all(m["identical_to_verifier"] is not False for m in report["methods"].values()),
        })
    with open(os.path.join(cell_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def markdown(results: list[dict], args) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        f"Recipe `{args.recipe}` with {' '.join(args.set) or 'no overrides'}; bench: {args.num_prompts} prompts from "
        f"`{args.prompts}`, {args.max_new_tokens} new tokens, T=0, draft lengths {args.num_draft_tokens} (best by measured speedup).",
        "",
        "| loss | data | top-1 agreement | acceptance T=1 | implied tau k=4 (T=1) | tau | best k | speedup | student tok/s | plain tok/s | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['loss']} | {r['data']} | {num(r.get('eval/top1_agreement'), '.3f')} | {num(r.get('eval/acceptance_T1'), '.3f')} "
            f"| {num(r.get('eval/tau_k4_T1'), '.2f')} | {num(r.get('tau'), '.2f')} | {r.get('best_k', '-')} "
            f"| {num(r.get('speedup'), '.2f')}x | {num(r.get('tokens_per_s'), '.1f')} | {num(r.get('plain_tokens_per_s'), '.1f')} "
            f"| {num(r.get('train_seconds'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "smollm2_distill_quick.yaml"), help="draft-model recipe every cell starts from (default: %(default)s)")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma list of %s (default: %%(default)s)" % ", ".join(LOSSES))
    p.add_argument("--data", default=",".join(DATA), help="comma list of %s (default: %%(default)s)" % ", ".join(DATA))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every cell, e.g. training.max_steps=20 (repeatable)")
    p.add_argument("--on-policy-fraction", type=float, default=1.0, help="share of examples answered by the student in on_policy cells (default: %(default)s)")
    p.add_argument("--fixed-examples", type=int, default=160, help="conversations in the fixed dataset (default: %(default)s)")
    p.add_argument("--output", default=os.path.join("runs", "distill_table"), help="folder for cells, table.md and table.json (default: %(default)s)")
    p.add_argument("--prompts", default=MT_BENCH if os.path.isfile(MT_BENCH) else "default", help="benchmark prompts (default: MT-Bench from ../shared if present, else the shipped prompts)")
    p.add_argument("--num-prompts", type=int, default=6, help="(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--num-draft-tokens", default="2,3,4", help="draft lengths the bench sweeps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-bench", action="store_true", help="train and evaluate only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    import torch

    from specheads.errors import SpecHeadsError
    from specheads.prompts import load_prompts
    from specheads.training.recipe import load_recipe
    from specheads.verifier import load_verifier

    losses = [x for x in args.losses.split(",") if x]
    datas = [x for x in args.data.split(",") if x]
    bad = [x for x in losses if x not in LOSSES] + [x for x in datas if x not in DATA]
    if bad:
        p.error(f"unknown loss or data source {bad}: losses are {LOSSES}, data sources {DATA}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    args.fixed_path = os.path.abspath(os.path.join(args.output, "fixed_conversations.jsonl"))
    if "fixed" in datas and not os.path.isfile(args.fixed_path):
        with open(args.fixed_path, "w") as f:
            for record in docstring_conversations(args.fixed_examples):
                f.write(json.dumps(record) + "\n")
    try:
        base = load_recipe(args.recipe, list(args.set))
        if base.drafter.kind != "draft_model":
            raise SpecHeadsError(f"{args.recipe} trains drafter.kind={base.drafter.kind}, not draft_model")
        verifier = load_verifier(base.verifier.name, dtype=base.verifier.dtype)
        encoded = [verifier.encode(q) for q in load_prompts(args.prompts, limit=args.num_prompts)]
        results = []
        for loss in losses:
            for data in datas:
                done = os.path.join(args.output, "cells", f"{loss}-{data}", "result.json")
                if os.path.isfile(done):
                    print(f"[distill_table] {loss} x {data}: done before, skipped", flush=True)
                    with open(done) as f:
                        results.append(json.load(f))
                    continue
                started = time.perf_counter()
                print(f"[distill_table] {loss} x {data}: training and benchmarking", flush=True)
                results.append(run_cell(loss, data, args, verifier, encoded))
                print(f"[distill_table] {loss} x {data}: {time.perf_counter() - started:.0f} s", flush=True)
    except SpecHeadsError as exc:
        print(f"distill_table: error: {exc}", file=sys.stderr)
        return 2
    table = markdown(results, args)
    with open(os.path.join(args.output, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output, "table.json"), "w") as f:
        json.dump({"recipe": args.recipe, "overrides": args.set, "prompts": args.prompts, "num_prompts": args.num_prompts,
                   "max_new_tokens": args.max_new_tokens, "cells": results}, f, indent=2)
    print(table)
    print(f"table: {os.path.join(args.output, 'table.md')} and table.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
