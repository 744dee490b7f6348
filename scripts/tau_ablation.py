"""τ per CPU minute of training choices, on one shared dataset (issue 20, item 3).

The data (the verifier's own answers and their features) is made once by the base recipe and
counted in every variant's CPU minutes; each variant then trains from scratch on it with its
``--set`` overrides and decodes the first turns of MT-Bench questions (never in the training
data) as a chain of 3, every drafted token verified (fixed control). It records training's
predicted chain τ beside the τ served, so the table in docs/eagle3.md shows both.

    python scripts/tau_ablation.py --recipe recipes/smollm2_eagle3_quick.yaml --root runs/ablation \\
        --variant base --variant ttt5:objective.ttt_steps=5 --variant ttt7:objective.ttt_steps=7 \\
        --variant orig-opt:training.adam_beta2=0.95,training.max_grad_norm=0.5
    python scripts/tau_ablation.py --root runs/ablation --table      # the markdown table of every variant

A variant is NAME[:KEY=VALUE,KEY=VALUE...]; one done is not redone. --dyn16 also decodes a
16-node dynamic tree 5 deep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_curve import ROOT, run, tau_eval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_eagle3_quick.yaml"))
    ap.add_argument("--root", default="runs/ablation")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared" / "data" / "mt_bench" / "question.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dyn16", action="store_true", help="also decode a 16-node dynamic tree")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the variants done")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shared = [f"data.self_distill.output_dir={root / 'data'}", f"training.hidden_cache_dir={root / 'features'}"]
    data_file = root / "data.json"
    if args.variant and not data_file.is_file():
        log = root / "data.log"
        t0 = time.time()
        cpu = run([sys.executable, "-m", "specheads.cli", "train", "--recipe", args.recipe, "--output-dir", str(root / "data-run"),
                   "--data-only", *sum((["--set", s] for s in shared), [])], log)
        data_file.write_text(json.dumps({"data_cpu_min": cpu / 60, "data_wall_min": (time.time() - t0) / 60}))
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        out = root / name
        if (out / "point.json").is_file():
            print(f"{name}: done before", flush=True)
            continue
        sets = [s for s in sets.split(",") if s]
        cmd = [sys.executable, "-m", "specheads.cli", "train", "--recipe", args.recipe, "--output-dir", str(out)]
        for s in shared + sets:
            cmd += ["--set", s]
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        train_cpu = run(cmd, out.with_suffix(".log"))  # the features are read from the shared cache after its first fill
        train_wall = time.time() - t0
        from specheads.prompts import load_prompts

        prompts = load_prompts(args.prompts, limit=args.num_prompts)
        taus = tau_eval(str(out / "drafter"), prompts, args.max_new_tokens, args.threads, trees=("chain3", "dyn16") if args.dyn16 else ("chain3",))
        summary = json.loads((out / "training_summary.json").read_text())
        data = json.loads(data_file.read_text())
        last_eval = [h for h in summary.get("history") or [] if "eval/tau_pred_k3" in h][-1]
        rec = {"variant": name, "sets": sets, "data_cpu_min": data["data_cpu_min"], "train_cpu_min": train_cpu / 60,
               "train_wall_min": train_wall / 60, "peak_rss_mib": summary.get("peak_memory", {}).get("host_rss"),
               "eval": {k: v for k, v in last_eval.items() if k.startswith("eval/")}, **taus}
        (out / "point.json").write_text(json.dumps(rec, indent=1))
        print(f"{name}: data {rec['data_cpu_min']:.1f} + train {rec['train_cpu_min']:.1f} CPU min; predicted chain3 tau "
              f"{rec['eval']['eval/tau_pred_k3']:.3f}, served {taus['chain3']['tau']:.3f}", flush=True)
    if args.table:
        print(table(root))


def table(root: Path) -> str:
    recs = [json.loads(p.read_text()) for p in sorted(root.glob("*/point.json"))]
    lines = ["| variant | overrides | CPU min data + train | held-out chain acc. a_0 / a_1 / a_2 | predicted τ chain 3 | served τ chain 3 | acceptance at 1 / 2 given 1 / 3 given 2 | dyn16 τ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: r["chain3"]["tau"], reverse=True):
        e, c = r["eval"], r["chain3"]
        acc = " / ".join(f"{e.get(f'eval/chain_acc_step{i}', 0):.3f}" for i in range(3))
        cond = " / ".join(f"{a:.2f}" for a in c["conditional_acceptance"][:3])
        dyn = f"{r['dyn16']['tau']:.3f}" if "dyn16" in r else "-"
        lines.append(f"| {r['variant']} | {', '.join(r['sets']) or '(recipe)'} | {r['data_cpu_min']:.1f} + {r['train_cpu_min']:.1f} | {acc} | "
                     f"{e['eval/tau_pred_k3']:.3f} | {c['tau']:.3f} | {cond} | {dyn} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
