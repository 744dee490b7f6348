"""SIGKILL a real `specheads train` run at random points, resume it each time, and get the weights
of the uninterrupted run: on one process and on two gloo (DDP) processes under accelerate launch.

The first kill of each chain lands while a checkpoint is being written (at a random save step in
the first half): the previous checkpoint must stay loadable. The others are spread over the rest of
the run, one at a random point of each of equal slices of it, each resuming the last. ``SPECHEADS_KILL_POINTS`` sets the number of kills per chain (default 1: each case
then stays under ~60 s of CPU); ``SPECHEADS_KILL_SEED`` fixes the random points.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KILL_POINTS = int(os.environ.get("SPECHEADS_KILL_POINTS", "1"))
MAX_STEPS, SAVE_EVERY = max(16, 2 * KILL_POINTS + 8), 2
RUN_TIMEOUT = 600  # seconds per run: generous, for a loaded CI machine


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny verifier directory (model + character tokenizer with a chat template), conversations
    and a recipe that accumulates 2 micro-batches per step and saves every 2 steps."""
    from tiny_text import VOCAB_SIZE, char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("kill")
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "conversations.jsonl", "w") as f:
        for i in range(40):
            answer = " ".join(str((i + j) % 10) for j in range(3 + i % 7))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count {i}"}, {"role": "assistant", "content": answer}]}) + "\n")
    (root / "recipe.yaml").write_text(f"""
verifier: {{name: {root / 'model'}, dtype: float32}}
drafter: {{kind: medusa, num_heads: 2}}
data: {{self_distill: null, conversations: {root / 'conversations.jsonl'}, max_length: 64, eval_fraction: 0.1}}
training: {{batch_size: 4, gradient_accumulation_steps: 2, max_steps: {MAX_STEPS}, save_every: {SAVE_EVERY}, eval_every: 8,
           log_every: 1, lr: 0.01, warmup_steps: 2, dtype: float32}}
""")
    return root


class Run:
    """One `specheads train` process (or accelerate launcher and its workers), in its own process group."""

    def __init__(self, job: Path, out: Path, procs: int, resume: bool):
        cmd = [str(ROOT / "train" / "train.py"), "--recipe", str(job / "recipe.yaml"), "--output-dir", str(out)]
        cmd += ["--resume"] if resume else []
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if procs == 1:
            cmd = [sys.executable] + cmd
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                   "--main_process_port", str(free_port())] + cmd
            env["ACCELERATE_USE_CPU"] = "1"
        self.procs = procs
        self.out = out
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.text = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._lock:
                self.text += chunk.decode(errors="replace")

    def output(self) -> str:
        with self._lock:
            return self.text

    def wait_until(self, done, timeout=RUN_TIMEOUT, poll=0.001) -> bool:
        """Poll ``done()`` until true (True) or the process exits first (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if done():
                return True
            if self.proc.poll() is not None:
                return done()
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"run timed out after {timeout} s:\n{self.output()[-3000:]}")

    def kill(self):
        """SIGKILL the whole job at once, as a scheduler or the OOM killer would. accelerate's
        launcher starts each worker in a session of its own, so its process group is not enough:
        every descendant is killed, workers first."""
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.procs == 1:
            os.kill(self.proc.pid, signal.SIGKILL)
        for p in [*reversed(tree), None]:
            try:
                os.killpg(os.getpgid(p.pid) if p is not None else self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=60)
        end = time.monotonic() + 60
        for p in tree:  # all gone (or dead and awaiting their reaper) before the next run touches the folder
            while time.monotonic() < end:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError(f"process {p.pid} survived SIGKILL")

    def finish(self):
        self.proc.wait(timeout=RUN_TIMEOUT)
        time.sleep(0.1)  # let the reader drain the pipe
        assert self.proc.returncode == 0, self.output()[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drafter_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "drafter" / "model.safetensors")


def checkpoints(out: Path) -> set[str]:
    root = out / "checkpoints"
    return set(os.listdir(root)) if root.is_dir() else set()


def assert_published_checkpoints_whole(out: Path) -> int | None:
    """Every step-N folder a killed run left is whole; returns the step --resume will continue from."""
    from specheads.training.resume import latest_checkpoint

    skipped = []
    found = latest_checkpoint(str(out), warn=skipped.append)
    assert not skipped, skipped
    steps = sorted(int(m.group(1)) for d in checkpoints(out) if (m := re.fullmatch(r"step-(\d+)", d)))
    for step in steps:  # older ones too: each is a complete checkpoint
        assert (out / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()
    return None if found is None else found[1]


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2], ids=["1-process", "2-gloo-processes"])
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(job, tmp_path, procs):
    seed = int(os.environ.get("SPECHEADS_KILL_SEED", str(random.SystemRandom().randrange(10**6))))
    rng = random.Random(seed)
    log = [f"seed {seed}, {KILL_POINTS} kill point(s), {procs} process(es)"]

    reference = Run(job, tmp_path / "reference", procs, resume=False)
    assert reference.wait_until(lambda: "training:" in reference.output())
    began = time.monotonic()
    reference.finish()
    train_seconds = time.monotonic() - began  # the training part of a run, setup excluded

    out = tmp_path / "killed"
    kills = attempts = 0
    spread_from = None  # the step the spread-out kills start from
    while kills < KILL_POINTS:
        attempts += 1
        assert attempts <= 3 * KILL_POINTS, "\n".join(log)
        resumed_at = (assert_published_checkpoints_whole(out) or 0) if attempts > 1 else 0
        run = Run(job, out, procs, resume=attempts > 1)
        if kills == 0:
            # Into a checkpoint write: a random save step after the first, killed as soon as its
            # temporary folder appears or up to 30 ms later.
            target = rng.randrange(2 * SAVE_EVERY, MAX_STEPS // 2 + 1, SAVE_EVERY)
            writing = f".step-{target}.tmp"
            if not run.wait_until(lambda: writing in checkpoints(out)):
                log.append(f"attempt {attempts}: finished before step {target} was saved")
                continue
            time.sleep(rng.uniform(0, 0.03))
        else:
            if not run.wait_until(lambda: "training:" in run.output()):
                log.append(f"attempt {attempts}: finished before training started")
                continue
            if spread_from is None:
                spread_from = resumed_at
            width = (MAX_STEPS - spread_from) / (KILL_POINTS - 1)
            at = spread_from + (kills - 1 + rng.uniform(0.05, 0.9)) * width  # a point in this kill's slice of the run
            time.sleep(max(train_seconds * (at - resumed_at) / MAX_STEPS, rng.uniform(0, 0.05 * train_seconds)))
        if run.proc.poll() is not None:
            log.append(f"attempt {attempts}: finished before the kill")
            continue
        run.kill()
        kills += 1
        left_over = sorted(checkpoints(out))
        writing_now = [d for d in left_over if re.fullmatch(r"\.step-\d+\.tmp", d)]
        latest = assert_published_checkpoints_whole(out)
        log.append(f"kill {kills}: resumed from step {resumed_at}, killed " + (f"while writing {writing_now[0]}" if writing_now else "between checkpoint writes")
                   + f"; latest whole checkpoint: step {latest}")
        if kills == 1 and writing_now == [writing]:  # the step being written is not there; the one before is
            assert latest == target - SAVE_EVERY, "\n".join(log + left_over)

    final = Run(job, out, procs, resume=True)
    final.finish()
    print("\n".join(log))
    ref, got = drafter_weights(tmp_path / "reference"), drafter_weights(out)
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}\n" + "\n".join(log))
    # the trainer state's history came back with each resume: the summaries agree too
    summary = [json.loads((d / "training_summary.json").read_text())["history"] for d in (tmp_path / "reference", out)]
    assert [h["step"] for h in summary[0]] == [h["step"] for h in summary[1]]
    losses = [[h["loss"] for h in s if "loss" in h] for s in summary]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
