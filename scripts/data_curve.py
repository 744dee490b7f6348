"""τ against CPU minutes for EAGLE-3 drafters trained on three kinds of data (issue 15, item 4).

Kinds:
  tf   ShareGPT replies teacher-forced through the verifier (``data.conversations: sharegpt``)
  sd   the verifier's own answers to ShareGPT conversations, turn by turn (``data.self_distill``)
  mix  half of each

Each point is one ``specheads train`` run (data, then training, each timed in CPU seconds of the
processes that ran it), then the drafter decodes MT-Bench first turns (never in the training
data) as a chain of 3 and as a dynamic tree, with every drafted token verified (fixed control),
giving τ and the acceptance per position given the earlier ones. Every point makes its own data
and features (nothing is shared between points, so each point's CPU minutes are all it cost);
self-distillation stores the features of what it generates, teacher-forced conversations get
theirs in the first epoch. A point done is not redone.

    python scripts/data_curve.py --points tf:300:2,sd:150:3,mix:300:3 --root runs/curve
    python scripts/data_curve.py --plot docs/eagle3_curve.png --root runs/curve

A point is KIND:SIZE:EPOCHS: SIZE conversations (mix: SIZE/2 of each), EPOCHS passes over them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "recipes" / "smollm2_eagle3_full.yaml"


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], log: Path) -> float:
    """CPU seconds the command's processes took."""
    before = child_cpu()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return child_cpu() - before


def point_sets(kind: str, size: int, epochs: int, out: Path, batch: int, sd_tokens: int, max_length: int) -> tuple[list[str], int]:
    """The recipe overrides of a point and its optimizer steps."""
    sets = [f"training.batch_size={batch}", f"data.max_length={max_length}", "training.cache_hidden_states=true",
            f"training.hidden_cache_dir={out / 'features'}", "data.eval_fraction=0.03"]
    if kind in ("sd", "mix"):
        n = size if kind == "sd" else size // 2
        sets += ["data.self_distill.prompts=sharegpt", f"data.self_distill.num_prompts={n}", "data.self_distill.turns=2",
                 f"data.self_distill.max_new_tokens={sd_tokens}", "data.self_distill.batch_size=64",
                 f"data.self_distill.output_dir={out / 'sd-data'}"]
    else:
        sets += ["data.self_distill=null"]
    if kind in ("tf", "mix"):
        n = size if kind == "tf" else size // 2
        sets += ["data.conversations=sharegpt", f"data.num_conversations={n}"]
    else:
        sets += ["data.conversations=null", "data.num_conversations=null"]
    steps = max(10, math.ceil(epochs * size * 0.97 / batch))
    sets += [f"training.max_steps={steps}", f"training.warmup_steps={max(2, steps // 20)}",
             f"training.eval_every={steps}", f"training.save_every={steps}", f"training.log_every={max(1, steps // 10)}"]
    return sets, steps


def tau_eval(drafter: str, prompts: list[str], max_new: int, threads: int, trees: tuple[str, ...] = ("chain3", "dyn16")) -> dict:
    """τ and acceptance per position on the prompts, chain of 3 and dynamic tree, every drafted token verified."""
    import torch

    from specheads.decoding.engine import SpeculativeDecoder
    from specheads.decoding.metrics import DecodingStats
    from specheads.drafters import build_drafter
    from specheads.verifier import load_verifier

    torch.set_num_threads(threads)
    v = load_verifier("smollm2-135m", dtype="auto")
    out = {}
    for name, tree, k in [t for t in (("chain3", "chain", 3), ("dyn16", "dyn16", 5)) if t[0] in trees]:
        d = build_drafter(drafter, v, tree=tree)
        dec = SpeculativeDecoder(v, d, num_draft_tokens=k, control="fixed")
        total = DecodingStats()
        for p in prompts:
            total.merge(dec.generate(v.encode(p), max_new_tokens=max_new).stats)
        acc = total.acceptance_per_position
        cond = [acc[0]] + [acc[i] / acc[i - 1] if acc[i - 1] else 0.0 for i in range(1, len(acc))]
        out[name] = {"tau": total.tau, "acceptance_per_position": acc, "conditional_acceptance": cond}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="", help="KIND:SIZE:EPOCHS,...")
    ap.add_argument("--root", default="runs/curve")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sd-tokens", type=int, default=192, help="new tokens per self-distilled answer (per turn)")
    ap.add_argument("--max-length", type=int, default=640)
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared" / "data" / "mt_bench" / "question.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default=None, help="write the plot of every point under --root here")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = root / "results.jsonl"
    for spec in [p for p in args.points.split(",") if p]:
        kind, size, epochs = spec.split(":")
        size, epochs = int(size), float(epochs)
        name = f"{kind}-{size}-e{epochs:g}"
        out = root / name
        if (out / "point.json").is_file():
            print(f"{name}: done before", flush=True)
            continue
        sets, steps = point_sets(kind, size, epochs, out, args.batch, args.sd_tokens, args.max_length)
        base = [sys.executable, "-m", "specheads.cli", "train", "--recipe", str(BASE), "--output-dir", str(out)]
        for s in sets:
            base += ["--set", s]
        log = out.with_suffix(".log")
        t0 = time.time()
        out.mkdir(parents=True, exist_ok=True)
        data_cpu = run(base + ["--data-only"], log)
        data_wall = time.time() - t0
        t1 = time.time()
        train_cpu = run(base, log)  # features of conversations generated above are read, not recomputed
        train_wall = time.time() - t1
        from specheads.prompts import load_prompts

        prompts = load_prompts(args.prompts, limit=args.num_prompts)
        taus = tau_eval(str(out / "drafter"), prompts, args.max_new_tokens, args.threads)
        summary = json.loads((out / "training_summary.json").read_text())
        rec = {"point": name, "kind": kind, "size": size, "epochs": epochs, "steps": steps,
               "data_cpu_min": data_cpu / 60, "train_cpu_min": train_cpu / 60, "data_wall_min": data_wall / 60,
               "train_wall_min": train_wall / 60, "peak_rss_mib": summary.get("peak_memory", {}).get("host_rss"),
               "eval": {k: v for k, v in (summary.get("history") or [{}])[-1].items() if k.startswith("eval/")},
               **taus}
        (out / "point.json").write_text(json.dumps(rec, indent=1))
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{name}: data {rec['data_cpu_min']:.1f} + train {rec['train_cpu_min']:.1f} CPU min; "
              f"chain3 tau {taus['chain3']['tau']:.2f}, dyn16 tau {taus['dyn16']['tau']:.2f}", flush=True)
    if args.plot:
        plot(root, args.plot)


def plot(root: Path, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads((p / "point.json").read_text()) for p in sorted(root.iterdir()) if (p / "point.json").is_file()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, color in (("tf", "#888"), ("sd", "#2a7"), ("mix", "#36c")):
        pts = sorted((r["data_cpu_min"] + r["train_cpu_min"], r) for r in recs if r["kind"] == kind)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ax.plot(xs, [r["dyn16"]["tau"] for _, r in pts], marker="o", color=color, label=f"{kind}: dynamic tree (16 nodes)")
        ax.plot(xs, [r["chain3"]["tau"] for _, r in pts], marker="s", ls="--", color=color, label=f"{kind}: chain of 3")
    ax.set_xlabel("CPU minutes (data + training)")
    ax.set_ylabel("τ on MT-Bench first turns")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("EAGLE-3 for SmolLM2-135M: τ per CPU minute, by kind of data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
