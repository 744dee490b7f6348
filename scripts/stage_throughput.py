"""Tokens per second of each EAGLE-3 data stage, in bfloat16 and float32 (issue 15, item 1 and 2).

Stages, on SmolLM2-135M with ShareGPT first user turns (MT-Bench never):
  features   a prefill over teacher-forced conversations that returns the three aux layers' hidden
             states and the last one (what a teacher-forced token costs)
  generate   self-distillation as the recipes run it: batched greedy HF ``generate`` with the
             features captured in the same pass, at each --batches size

    python scripts/stage_throughput.py --threads 2 --batches 16,32,64,128

Measure on a quiet machine (nothing else on the cores): contention slows torch's thread pool
many times over. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def feature_rate(verifier, ids: list[list[int]], aux: list[int], batch: int, length: int) -> float:
    from specheads.training.features import FeatureCapture

    x = torch.tensor([r[:length] for r in ids[:batch]], device=verifier.device)  # every row has >= length tokens
    with torch.no_grad(), FeatureCapture(verifier.model, aux):
        verifier.model(input_ids=x[:, :32])  # warm-up
        t0 = time.perf_counter()
        verifier.model(input_ids=x)
        dt = time.perf_counter() - t0
    return x.numel() / dt


def generate_rate(verifier, prompts: list[str], batch: int, new: int, aux: list[int]) -> float:
    from specheads.training.data import MANIFEST, generate_self_distillation
    from specheads.training.features import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(f"{tmp}/features", verifier, aux, say=lambda *_: None)
        t0 = time.perf_counter()
        generate_self_distillation(verifier, prompts[:batch], f"{tmp}/sd", max_new_tokens=new, batch_size=batch,
                                   shard_size=max(64, batch), progress=False, capture=(store, aux, 2048))
        return json.loads((Path(tmp) / "sd" / MANIFEST).read_text())["runs"][-1]["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="16,32,64,128")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from specheads.training.sharegpt import first_exchanges, first_user_turns
    from specheads.verifier import load_verifier

    prompts = [p for p in first_user_turns(limit=2000) if len(p) < 400][:128]
    rows = []
    for dtype in args.dtypes.split(","):
        v = load_verifier("smollm2-135m", dtype=dtype)
        aux = [2, 15, 27]
        convs = [v.encode(e["messages"][0]["content"] + " " + e["messages"][1]["content"]) for e in first_exchanges(limit=64)]
        convs = [c for c in convs if len(c) >= 448][:4]
        rows.append((dtype, "features: prefill 4x448 with aux hidden states", feature_rate(v, convs, aux, 4, 448)))
        for b in [int(b) for b in args.batches.split(",")]:
            if dtype == "float32" and b > 16:
                continue  # float32 is the slow path: one size shows the ratio
            rows.append((dtype, f"self-distillation + features, batch {b}, {args.new_tokens} new", generate_rate(v, prompts, b, args.new_tokens, aux)))
            print(rows[-1], flush=True)
    print("\n| dtype | stage | tokens/s |\n|---|---|---|")
    for d, s, r in rows:
        print(f"| {d} | {s} | {r:,.0f} |")


if __name__ == "__main__":
    main()
