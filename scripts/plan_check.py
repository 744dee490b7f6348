"""Check `specheads plan`'s activation estimate against a measured EAGLE-3 training step.

A random Llama-shaped verifier (bf16, as ``dtype: auto`` loads it on a GPU or an AVX512-BF16 CPU)
and the real ``Eagle3Objective`` run one online step (verifier forward with its features, teacher
targets, training-time test, backward) on one sequence of L tokens, under bfloat16 autocast as the
training loop runs it. Each length runs in a fresh process, whose peak resident memory after the
step minus before it is the step's own peak (CPU: no allocator statistics, so ``ru_maxrss``).

    python scripts/plan_check.py --lengths 512,1024,2048

It prints, per length, the plan's activation terms and the measured peak, side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from types import SimpleNamespace

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192, tie_word_embeddings=False)
DRAFT_VOCAB, TTT, ANSWER_SHARE = 8000, 7, 0.6


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def one(L: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specheads.training.objectives.eagle3 import Eagle3Objective
    from specheads.verifier import Verifier

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16).eval().requires_grad_(False)
    verifier = Verifier(model=model, tokenizer=None, name="random-llama")
    token_map = torch.randperm(SHAPE["vocab_size"])[:DRAFT_VOCAB].sort().values
    objective = Eagle3Objective(verifier, SimpleNamespace(aux_layer_ids=None, num_layers=1),
                                SimpleNamespace(ttt_steps=TTT, ttt_decay=0.8), token_map)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, L))
    answer = torch.zeros(1, L, dtype=torch.long)
    answer[:, int(L * (1 - ANSWER_SHARE)):] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_mask": answer}
    # a first, short step allocates what any step needs (kernels, optimizer-free grads)
    short = {k: v[:, :64] for k, v in batch.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective.loss(objective.module, short)[0].backward()
    before = rss_gib()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = objective.loss(objective.module, batch)
    loss.backward()
    return {"L": L, "measured_gib": rss_gib() - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    from transformers import LlamaConfig

    from specheads.scale_plan import Hardware, plan

    lengths = [int(x) for x in args.lengths.split(",")]
    p = plan(LlamaConfig(**SHAPE), verifier="random-llama", draft_vocab_size=DRAFT_VOCAB, ttt_steps=TTT, lengths=lengths,
             hardware=Hardware(gpus=1), answer_share=ANSWER_SHARE)
    print("| L | plan: verifier fwd | teacher | drafter TTT | plan total | measured peak of the step | measured / plan |")
    print("|---|---|---|---|---|---|---|")
    for L in lengths:
        out = subprocess.run([sys.executable, __file__, "--one", str(L)], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured_gib"]
        m = p.memory[L]
        total = m["activations_verifier"] + m["activations_teacher"] + m["activations_drafter"]
        print(f"| {L} | {m['activations_verifier']:.2f} | {m['activations_teacher']:.2f} | {m['activations_drafter']:.2f} | "
              f"{total:.2f} GiB | {measured:.2f} GiB | {measured / total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
