"""One explicit accelerate training loop for every drafter kind.

A run reads top to bottom like a torchtune recipe: ``TrainingRun.setup`` (accelerator, verifier,
data) -> ``resume_point`` (the checkpoint to continue, checked before anything is built) ->
``build`` (objective, optimizer, schedule, distributed wrapping, the checkpoint's state) ->
``train``: ``optimizer_step`` over the micro-batches ``micro_batch`` gives, with ``log``,
``evaluate`` and ``save_checkpoint`` on their cadence -> ``save_drafter``. The same script runs on
one process, DDP, FSDP or DeepSpeed: ``accelerate launch`` picks the backend.

Steps: ``max_steps``, ``eval_every``, ``save_every``, ``log_every`` and the schedule count
optimizer steps; each takes ``gradient_accumulation_steps`` micro-batches of ``batch_size``
(global) examples, and its loss is normalised over the whole step (``_step_counts``), so G
micro-batches of b give the same update as one batch of G*b.

Resume: ``save_state`` checkpoints hold model, optimizer, scheduler and RNG states, written only
between optimizer steps (no accumulated gradient is ever lost), every ``save_every`` steps and at
the last step. The data order is a function of (seed, micro-batch number), so a resumed run skips
the batches already seen and then sees exactly what an uninterrupted run would have. Each
checkpoint records the recipe values this depends on (``resume.resume_fields``); ``--resume``
refuses a recipe that changed them. A finished run resumed with a larger ``max_steps`` (``--force``)
continues from its last step, its learning rate following the re-stretched cosine schedule from
there on (``_follow_schedule``): the weights are an uninterrupted longer run's exactly when the
steps already taken did not depend on ``max_steps`` (all within the warmup). A run resumed at its
last step trains nothing: it writes the drafter if it was killed before that, else it is refused.

Several processes: each divides its loss by its share of the global count, so DDP's gradient
average equals one process's gradient of the global batch. DDP averages gradients only after its
own forward ran; an objective that calls the wrapped module's parts directly (Medusa's heads)
gets the same average from ``_average_gradients``. The scheduler is not prepared (accelerate would
step it once per process) but registered for checkpointing. DeepSpeed without CUDA gets the gloo
backend, and its "auto" batch sizes are filled in here. ZeRO-3 / FSDP shards are gathered for
every save (``get_state_dict`` is collective). The frozen verifier is loaded whole, or with
``verifier.shard`` its decoder layers are sharded across the processes (``sharded_verifier``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from ..atomic_files import atomic_directory, write_json_atomic
from ..errors import SpecHeadsError
from .batches import collate
from .recipe import Recipe
from .resume import CHECKPOINTS, TRAINER_STATE, check_resume, latest_checkpoint, resume_fields, resume_record, save_checkpoint

HISTORY_KEPT = 20  # history entries kept in checkpoints and in training_summary.json
SUMMARY = "training_summary.json"


LENGTH_GROUP, LENGTH_RUN, LENGTH_JITTER = 256, 16, 0.1


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[int]:
    """The examples of an epoch in a random order fixed by (seed, epoch). With ``lengths``, each
    group of ``LENGTH_GROUP`` examples is sorted by length (times a random factor within
    1 +- LENGTH_JITTER, so the runs differ from epoch to epoch even in a small dataset) and cut
    into runs of ``LENGTH_RUN`` whose order is shuffled: consecutive examples (a batch) have
    similar lengths, so a batch pads little, while the order stays random at the scale of runs.
    It depends on neither the batch size nor the process count, so G micro-batches of b see what
    one batch of G*b does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return order
    jitter = (1 + LENGTH_JITTER * (2 * torch.rand(n, generator=g) - 1)).tolist()
    out: list[int] = []
    for start in range(0, n, LENGTH_GROUP):
        group = sorted(order[start : start + LENGTH_GROUP], key=lambda i: lengths[i] * jitter[i])
        runs = [group[r : r + LENGTH_RUN] for r in range(0, len(group), LENGTH_RUN)]
        for r in torch.randperm(len(runs), generator=g).tolist():
            out += runs[r]
    return out


def train(recipe: Recipe, *, resume: bool = False, force: bool = False, verifier=None, datasets=None, progress: bool = True,
          data_only: bool = False) -> str:
    """Run a recipe; returns the path of the final drafter checkpoint.

    ``verifier`` and ``datasets`` (train, eval) may be passed in (tests, notebooks); by default
    they come from the recipe. ``data_only`` stops once the data is ready (self-distilled and
    split) and returns its folder: generate on many processes first, train later. ``force``
    (with ``resume``) accepts a checkpoint whose recipe differs in ``resume.SAFE_TO_CHANGE`` values only.
    """
    if force and not resume:
        raise SpecHeadsError("--force only applies with --resume (it accepts a changed training.max_steps or cadence)")
    run = TrainingRun(recipe, progress)
    run.setup(verifier, datasets)
    if data_only:
        return run.data_ready()
    run.build(run.resume_point(force) if resume else None)
    return run.train()


class TrainingRun:
    """The state a run's phases share: what setup and build make, the step, the history."""

    def __init__(self, recipe: Recipe, progress: bool = True):
        self.recipe, self.t, self.progress = recipe, recipe.training, progress
        self.step = 0
        self.history: list[dict] = []
        self.last_eval: dict = {}
        self._orders: dict[int, list[int]] = {}  # the current epoch's example order
        self._lengths: list[int] | None = None
        self._ddp_forwards = 0

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, verifier=None, datasets=None) -> None:
        """The accelerator, the verifier and the (train, eval) datasets: all but what is trained."""
        from .objectives import check_recipe_for_verifier

        t = self.t
        os.makedirs(t.output_dir, exist_ok=True)
        self.accelerator = acc = _accelerator(t)
        self.main, self.P, self.rank = acc.is_main_process, acc.num_processes, acc.process_index
        self.compute_dtype, why = training_dtype(t.dtype, acc.device)
        if self.main and self.progress:
            print(f"[specheads] the drafter trains in {str(self.compute_dtype).replace('torch.', '')} ({why}; weights and optimizer "
                  "state in float32)", flush=True)
        verifier = self._verifier(verifier)
        check_recipe_for_verifier(self.recipe, verifier)
        if datasets is None:
            from .pipeline import prepare_datasets

            datasets = prepare_datasets(self.recipe, verifier, acc)
        self.verifier = verifier
        self.train_ds, self.eval_ds = datasets
        if len(self.train_ds) == 0:
            raise SpecHeadsError("the training dataset is empty")
        self.fields = resume_fields(self.recipe, len(self.train_ds))
        self.pad_id = (verifier.eos_token_ids or [0])[0]

    def _verifier(self, verifier=None):
        """The frozen verifier: loaded whole on every process, or with ``verifier.shard`` and several
        processes its decoder layers sharded across them (``sharded_verifier``); one passed in is
        sharded in place."""
        section, acc = self.recipe.verifier, self.accelerator
        shard = section.shard != "none" and self.P > 1
        if section.shard != "none" and self.P == 1 and self.main and self.progress:
            print(f"[specheads] verifier.shard {section.shard}: one process, so the verifier is loaded whole", flush=True)
        if verifier is None:
            from ..verifier import load_verifier
            from .sharded_verifier import load_sharded_verifier

            with _loaded_whole():
                if shard:
                    verifier = load_sharded_verifier(section, acc)
                else:
                    # float32_head off: training reads hidden states and batched argmaxes, where the head's
                    # float32 refinement of near-ties only costs time (a batch of rows often holds one)
                    verifier = load_verifier(section.name, dtype=section.dtype, device=acc.device, float32_head=False,
                                             trust_remote_code=section.trust_remote_code)
        elif shard:
            from .sharded_verifier import shard_verifier

            verifier = shard_verifier(verifier, section.shard, acc)
        if shard and self.progress:
            from .sharded_verifier import sharded

            acc.print(f"[specheads] {sharded(verifier.model).describe()}")
        return verifier

    def data_ready(self) -> str:
        """--data-only: the data is self-distilled and split; say where, and train nothing."""
        where = self.recipe.data.conversations or self.recipe.data.self_distill.output_dir
        if self.main and self.progress:
            print(f"[specheads] data ready: {len(self.train_ds)} train + {len(self.eval_ds)} eval conversations from {where}", flush=True)
        self.accelerator.end_training()
        return str(where)

    def resume_point(self, force: bool) -> tuple[str, int, dict] | None:
        """The newest whole checkpoint, checked against this recipe before anything is built (a
        changed drafter shape is named, not a load_state traceback); None: start fresh."""
        t, say = self.t, self.accelerator.print
        found = latest_checkpoint(t.output_dir, warn=say)
        if found is None:
            say(f"[specheads] --resume: no checkpoint in {t.output_dir}/{CHECKPOINTS}, starting fresh")
            return None
        path, start, saved = found
        for change in check_resume(path, saved, self.fields, force):
            say(f"[specheads] --resume --force: accepted {change}")
        if start > t.max_steps or (start == t.max_steps and self._finished(path)):
            raise SpecHeadsError(f"--resume: checkpoint {path} is at step {start}, not before training.max_steps={t.max_steps}: nothing left to train"
                                 + (" (the run is finished; --resume --force with a larger training.max_steps continues it)" if start == t.max_steps else ""))
        if start == t.max_steps:  # killed after its last checkpoint: only the drafter is left to write
            say(f"[specheads] --resume: {path} is the last step; writing the drafter the run ends with")
        return found

    def _finished(self, path: str) -> bool:
        """Whether the run ending at checkpoint ``path`` wrote its drafter and summary (after it)."""
        summary = os.path.join(self.t.output_dir, SUMMARY)
        try:
            with open(summary) as f:
                steps = json.load(f).get("steps")
            newer = os.path.getmtime(summary) >= os.path.getmtime(os.path.join(path, TRAINER_STATE))
        except (OSError, ValueError, AttributeError):
            return False
        return steps == self.t.max_steps and newer and os.path.isdir(os.path.join(self.t.output_dir, "drafter"))

    def build(self, found: tuple[str, int, dict] | None) -> None:
        """Objective, optimizer and schedule, wrapped for the processes; a checkpoint's state on top."""
        from .objectives import make_objective

        t, acc = self.t, self.accelerator
        self.objective = make_objective(self.recipe, self.verifier, self.train_ds)
        if t.cache_hidden_states:
            self.objective.hidden_cache = _open_hidden_cache(acc, self.objective, self.train_ds, self.verifier, t)
        module = self.objective.module.to(acc.device)
        groups = self.objective.param_groups(module, t.lr, t.weight_decay)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, t.adam_beta2))
        self.scheduler = _schedule(optimizer, t, len(groups))
        self.per_process = t.batch_size // self.P
        if self.per_process < 1 or self.per_process * self.P != t.batch_size:
            raise SpecHeadsError(f"training.batch_size={t.batch_size} must be a multiple of the {self.P} processes")
        ds = getattr(acc.state, "deepspeed_plugin", None)
        if ds is not None:  # we batch ourselves, so DeepSpeed's "auto" batch sizes are filled in here
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = self.per_process
            ds.deepspeed_config["gradient_accumulation_steps"] = t.gradient_accumulation_steps
            ds.deepspeed_config["train_batch_size"] = t.batch_size * t.gradient_accumulation_steps
        # The scheduler stays unprepared: accelerate would step it once per process, and the schedule
        # must be the same on 1 or N processes. It is still saved and restored with the state.
        self.module, self.optimizer = acc.prepare(module, optimizer)
        _register_fsdp_methods(self.module, self.objective, self.recipe.drafter.kind)
        acc.register_for_checkpointing(self.scheduler)
        self.ddp = self.module if isinstance(self.module, torch.nn.parallel.DistributedDataParallel) else None
        if self.ddp is not None:  # counts DDP's own forwards, after which it averages gradients itself
            self.ddp.register_forward_pre_hook(lambda *_: setattr(self, "_ddp_forwards", self._ddp_forwards + 1))
        if found is not None:
            self.restore(found)
        loader = DataLoader(self.eval_ds, batch_size=self.per_process, collate_fn=lambda b: collate(b, self.pad_id))
        self.eval_loader = acc.prepare_data_loader(loader, device_placement=True) if self.P > 1 else loader

    def restore(self, found: tuple[str, int, dict]) -> None:
        path, self.step, saved = found
        self.accelerator.load_state(path)
        _follow_schedule(self.scheduler)
        self.history = list(saved.get("history") or [])
        self.last_eval = dict(saved.get("last_eval") or {})  # the drafter of a run resumed at its last step records it
        self.accelerator.print(f"[specheads] resumed from {path} (step {self.step})")

    # -- the data order -------------------------------------------------------------------------
    def micro_batch(self, m: int) -> tuple[int, dict, bool]:
        """(epoch, this process's share, real) of the run's m-th micro-batch: a function of (seed, m)
        only, so a resumed run, or G micro-batches of b against one of G*b, see the same examples."""
        t, n = self.t, len(self.train_ds)
        epoch, offset = divmod(m, math.ceil(n / t.batch_size))
        if epoch not in self._orders:
            if t.group_by_length and self._lengths is None:
                self._lengths = [len(ids) for ids in self.train_ds["input_ids"]]
            self._orders = {epoch: epoch_order(n, t.seed, epoch, self._lengths if t.group_by_length else None)}
        idx = self._orders[epoch][offset * t.batch_size : (offset + 1) * t.batch_size]
        # Each process takes its slice of the global batch (a short last one is spread evenly).
        mine = idx[self.rank * len(idx) // self.P : (self.rank + 1) * len(idx) // self.P]
        real = bool(mine)
        if not real:  # nothing left for this process: a zero-weight stand-in keeps it in every collective
            mine = idx[:1]
        batch = collate([self.train_ds[i] for i in mine], self.pad_id, mine)
        return epoch, {k: v.to(self.accelerator.device) for k, v in batch.items()}, real

    # -- one optimizer step ---------------------------------------------------------------------
    def optimizer_step(self) -> tuple[torch.Tensor, dict[str, float], int]:
        """One optimizer step over G micro-batches: (this process's loss, the objective's terms, epoch)."""
        acc, G = self.accelerator, self.t.gradient_accumulation_steps
        micro = [self.micro_batch(self.step * G + g) for g in range(G)]
        normalizers = self._normalizers(micro)  # before the counter reset: counting runs forwards too
        self._ddp_forwards = 0
        acc.step = 0  # accelerate counts micro-batches itself: it syncs on the G-th of this step
        step_loss = torch.zeros((), device=acc.device)
        metrics: dict[str, float] = {}
        for (_, batch, real), normalize in zip(micro, normalizers):
            with acc.accumulate(self.module):
                with self.autocast():
                    loss, parts = self.objective.loss(self.module, batch, normalize=normalize)
                loss = loss * (1.0 if real else 0.0)
                # Each loss is already its share of the whole step's mean; accelerate (and DeepSpeed's
                # engine) divide it by G once more, which this undoes.
                acc.backward(loss * G)
                if acc.sync_gradients:
                    self._finish_gradients()
                self.optimizer.step()
                self.optimizer.zero_grad()
            step_loss = step_loss + loss.detach()
            if real:  # the objective's terms are shares of the step's mean too: they add up
                for k, v in parts.items():
                    metrics[k] = metrics.get(k, 0.0) + v
        if not acc.sync_gradients:
            raise RuntimeError(f"internal: accelerate did not sync gradients after {G} micro-batches")
        self.scheduler.step()
        self.step += 1
        return step_loss, metrics, micro[-1][0]

    def _finish_gradients(self) -> None:
        if self.ddp is not None and not self._ddp_forwards:  # DDP's reducer never ran: average as it would have
            _average_gradients(list(self.module.parameters()), self.P)
        if self.t.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.module.parameters(), self.t.max_grad_norm)

    def _normalizers(self, micro) -> list:
        """Per micro-batch, what the objective divides each loss term's count by: the global count
        of that term over the whole optimizer step (counted first when G > 1)."""
        if len(micro) == 1:
            return [self._live_normalize(1.0 if real else 0.0) for _, _, real in micro]
        totals = self._step_counts(micro)
        return [self._step_normalize(totals) for _ in micro]

    def _live_normalize(self, weight: float):
        def normalize(count):
            # Each process divides by its share of the global count, so DDP's gradient average
            # equals the single-process gradient of the global batch.
            count = count.detach() * weight
            if self.P == 1:
                return count
            return self.accelerator.reduce(count, reduction="sum") / self.P
        return normalize

    def _step_normalize(self, totals: torch.Tensor):
        calls = itertools.count()

        def normalize(count):
            j = next(calls)
            if j >= len(totals):
                raise SpecHeadsError("the objective's loss asked for more counts than when the step was counted: it must be deterministic")
            return totals[j].to(count.device, count.dtype) / self.P
        return normalize

    def _step_counts(self, micro) -> torch.Tensor:
        """Global count of each ``normalize`` call (the i-th call of every micro-batch: one loss
        term) over the whole optimizer step. A micro-batch's gradient must be divided by these,
        known only after all G micro-batches are seen, so they are counted first by a gradient-free
        pass (one extra forward per micro-batch), under a forked RNG so that the real pass draws
        what it would have."""
        acc = self.accelerator
        per_call: list[torch.Tensor] = []
        devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for _, batch, real in micro:
                calls: list[torch.Tensor] = []

                def record(count):
                    calls.append(count.detach().float().reshape(()) * float(real))
                    return count

                with self.autocast():
                    self.objective.loss(self.module, batch, normalize=record)
                for j, c in enumerate(calls):
                    if j < len(per_call):
                        per_call[j] = per_call[j] + c
                    else:
                        per_call.append(c)
        totals = torch.stack(per_call).to(acc.device) if per_call else torch.zeros(0, device=acc.device)
        if self.P > 1:
            n = int(acc.gather(torch.tensor([len(totals)], device=acc.device)).max())
            totals = torch.cat([totals, totals.new_zeros(n - len(totals))])
            totals = acc.reduce(totals, reduction="sum")
        return totals

    # -- the run --------------------------------------------------------------------------------
    def train(self) -> str:
        """Optimizer steps up to ``max_steps``, with logging, evaluation and checkpoints on their
        cadence and all three at the last step; then the drafter."""
        from tqdm.auto import tqdm

        t = self.t
        if self.main:
            self.accelerator.init_trackers("specheads", config=_flat(asdict(self.recipe)))
        bar = tqdm(total=t.max_steps, initial=self.step, desc="training", disable=not (self.progress and self.main))
        started = time.perf_counter()
        self.module.train()
        while self.step < t.max_steps:
            step_loss, metrics, epoch = self.optimizer_step()
            bar.update(1)
            last = self.step == t.max_steps
            if self.step % t.log_every == 0 or last:
                bar.set_postfix(loss=f"{self.log(step_loss, metrics, epoch):.3f}")
            if self.step % t.eval_every == 0 or last:
                self.evaluate()
            if self.step % t.save_every == 0 or last:  # the last one lets a larger max_steps continue the run
                self.save_checkpoint()
        bar.close()
        return self.save_drafter(time.perf_counter() - started)

    def log(self, step_loss: torch.Tensor, metrics: dict, epoch: int) -> float:
        mean_loss = self.accelerator.reduce(step_loss, reduction="mean").item()
        metrics = {**metrics, "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0], "epoch": epoch}
        self.accelerator.log(metrics, step=self.step)
        self.history.append({"step": self.step, **metrics})
        return mean_loss

    def autocast(self):
        """The drafter's compute dtype (bfloat16 autocast, or nothing for float32)."""
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)

    def evaluate(self) -> None:
        with self.autocast():
            result = evaluate(self.objective, self.module, self.eval_loader, self.accelerator)
        self.accelerator.log(result, step=self.step)
        self.history.append({"step": self.step, **result})
        self.accelerator.print(f"[specheads] step {self.step}: " + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in result.items() if "rank" not in k))
        self.last_eval = result
        self.module.train()

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "history": self.history[-HISTORY_KEPT:], "resume": resume_record(self.fields), "last_eval": self.last_eval}
        save_checkpoint(self.accelerator, self.objective, self.module, self.t.output_dir, self.step, state)  # resume's, via this module (tests interrupt it)

    def save_drafter(self, elapsed: float) -> str:
        """The drafter with its last held-out evaluation (Medusa's data-driven trees read it), the
        adapted verifier (Medusa-2) and training_summary.json; returns the drafter's folder."""
        acc, t = self.accelerator, self.t
        final = os.path.join(t.output_dir, "drafter")
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.module)  # collective: gathers ZeRO-3 / FSDP shards on the main process
        if self.main:
            info = {"steps": self.step, "train_seconds": elapsed, "peak_memory": peak_memory(acc.device),
                    "history": self.history[-HISTORY_KEPT:], "recipe": asdict(self.recipe)}
            predicted = predicted_taus(self.last_eval)
            if predicted:
                info["predicted_tau_chain"] = predicted
            if t.lora is not None:
                _save_tuned_verifier(acc, self.module, self.verifier, os.path.join(t.output_dir, "verifier"))
            self.objective.save(state, final, training={"steps": self.step, "train_seconds": elapsed, "eval": self.last_eval})
            write_json_atomic(os.path.join(t.output_dir, SUMMARY), info)  # last: _finished reads it
            acc.print(f"[specheads] trained {self.step} steps in {elapsed:.0f} s; peak memory " + ", ".join(f"{k} {v:.0f} MiB" for k, v in info["peak_memory"].items()))
            if predicted:
                acc.print("[specheads] predicted tau of a chain of k drafts, from the held-out chain acceptance (eval/chain_acc_step*): "
                          + ", ".join(f"k={k} {v:.2f}" for k, v in predicted.items())
                          + " (`specheads bench --tree chain --control fixed --num-draft-tokens K` measures the served one)")
            acc.print(f"[specheads] drafter checkpoint: {final}")
        acc.wait_for_everyone()
        acc.end_training()
        return final


def predicted_taus(evaluation: dict) -> dict[int, float]:
    """{k: the predicted tau of a chain of k drafts} from an evaluation's ``eval/tau_pred_k{k}``
    (objectives that record chain acceptance: EAGLE-3); empty for others."""
    prefix = "eval/tau_pred_k"
    found = {int(key[len(prefix):]): v for key, v in evaluation.items() if key.startswith(prefix) and v is not None}
    return dict(sorted(found.items()))


def training_dtype(name: str, device) -> tuple[torch.dtype, str]:
    """(the drafter's compute dtype, why) for ``training.dtype``."""
    if name == "float32":
        return torch.float32, "training.dtype float32"
    from ..verifier import native_bf16, warn_if_emulated_bf16

    native = native_bf16(torch.device(device))
    if name == "bfloat16":
        if native:
            return torch.bfloat16, "training.dtype bfloat16"
        ratio = warn_if_emulated_bf16(torch.bfloat16, torch.device(device), native=lambda d: None)
        slower = f": a bfloat16 matrix product took {ratio:.1f}x float32's here" if ratio else ""
        return torch.bfloat16, f"training.dtype bfloat16 (emulated on this device{slower})"
    if native:
        return torch.bfloat16, f"training.dtype auto: {native}"
    return torch.float32, "training.dtype auto: no native bfloat16 here"


def _accelerator(t):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        # Without CUDA accelerate picks no process-group backend for DeepSpeed and every rank
        # believes it is the only one (while DeepSpeed runs a 2-rank world); gloo makes it see them all.
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(gradient_accumulation_steps=t.gradient_accumulation_steps, log_with="tensorboard" if _has_tensorboard() else None,
                              project_dir=t.output_dir, kwargs_handlers=handlers)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() != accelerator.num_processes:
        raise SpecHeadsError(f"accelerate sees {accelerator.num_processes} process(es) but torch.distributed runs {torch.distributed.get_world_size()}: "
                             "check the launch configuration (backend, ACCELERATE_USE_CPU)")
    set_seed(t.seed)
    return accelerator


def _schedule(optimizer, t, num_groups: int):
    """Cosine with warmup, built over optimizer steps and stepped once per optimizer step."""
    from transformers import get_cosine_schedule_with_warmup

    base = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    if t.lora is None or not t.lora.heads_warmup_steps:
        return base
    # Medusa-2: the adapters' learning rate stays 0 until the heads have warmed up.
    warm = t.lora.heads_warmup_steps
    lambdas = [base.lr_lambdas[0]] + [lambda s, w=warm: 0.0 if s < w else min(1.0, (s - w + 1) / max(1, t.warmup_steps)) for _ in range(num_groups - 1)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _follow_schedule(scheduler) -> None:
    """Set the restored optimizer's learning rates from this run's schedule at the restored step.
    They hold what the checkpoint's schedule gave, which a larger max_steps re-stretches: without
    this the first resumed step would still use the old one (0 at the end of a finished cosine).
    With the schedule unchanged this sets the same values."""
    for group, base, lam in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lam(scheduler.last_epoch)


def _register_fsdp_methods(module, objective, kind: str) -> None:
    """Under FSDP2 the drafter's weights are gathered only around forward and the methods registered
    for it: an objective whose loss calls other methods names them (``drafter_methods``); one that
    calls submodules directly (Medusa's heads, a student's parts) cannot run sharded this way."""
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    if not isinstance(module, FSDPModule):
        return
    methods = getattr(objective, "drafter_methods", None)
    if methods is None:
        raise SpecHeadsError(
            f"drafter.kind={kind} cannot be trained under FSDP (its objective calls the drafter's parts outside forward, "
            "which FSDP2 does not gather): launch with recipes/accelerate/deepspeed_zero3_8gpu.yaml (ZeRO-3 gathers every "
            "submodule) or DDP, and shard the frozen verifier with verifier.shard")
    for name in methods:
        register_fsdp_forward_method(module, name)


def _average_gradients(params: list, processes: int) -> None:
    """What DDP's reducer would have done: every process gets the mean gradient. A parameter with
    a gradient on some process only gets zeros elsewhere; one with none anywhere is left alone."""
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(has)
    for p, n in zip(params, has.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(processes)


def peak_memory(device) -> dict[str, float]:
    """Peak resident memory of this process (MiB), and the accelerator's peak allocation."""
    import resource

    out = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.device(device).type == "cuda":
        out["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@torch.no_grad()
def evaluate(objective, module, loader, accelerator) -> dict[str, float]:
    module.eval()
    total: dict[str, torch.Tensor] | None = None
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        counts = objective.eval_counts(module, batch)
        total = counts if total is None else {k: total[k] + counts[k] for k in counts}
    if total is None:
        return {}
    if accelerator.num_processes > 1:
        total = {k: accelerator.reduce(v.to(accelerator.device), reduction="sum").cpu() for k, v in total.items()}
    return objective.summarize(total)


def _save_tuned_verifier(accelerator, module, verifier, path: str) -> None:
    """Medusa-2: merge the LoRA adapters and save the adapted verifier the heads were trained with."""
    tuned = accelerator.unwrap_model(module).tuned_verifier
    merged = tuned.merge_and_unload()

    def write(tmp):
        merged.save_pretrained(tmp, safe_serialization=True)
        if verifier.tokenizer is not None:
            verifier.tokenizer.save_pretrained(tmp)

    atomic_directory(path, write)
    accelerator.print(f"[specheads] adapted verifier (Medusa-2, LoRA merged): {path}")


@contextlib.contextmanager
def _loaded_whole():
    """Load the frozen verifier whole, not partitioned by ZeRO-3: it is not trained, and the
    drafter reads its LM head (``verifier.shard`` shards its layers afterwards, itself).
    transformers partitions any model loaded while a ZeRO-3 config is registered, so the
    registration is lifted for the load."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _open_hidden_cache(accelerator, objective, train_ds, verifier, t):
    """The objective's on-disk cache of what the frozen verifier gives each training token: its
    own (``open_hidden_cache``, e.g. EAGLE-3's features) or the verifier's last hidden states."""
    from ..checkpoint import verifier_info
    from .hidden_cache import HiddenStateCache, cache_key

    if t.lora is not None:
        raise SpecHeadsError("training.cache_hidden_states needs a frozen verifier; it cannot be used with training.lora (Medusa-2)")
    rows = train_ds["input_ids"]
    lengths = [len(ids) for ids in rows]
    key = cache_key(verifier_info(verifier), rows)
    path = t.hidden_cache_path()
    if hasattr(objective, "open_hidden_cache"):
        size = objective.describe_cache(lengths)

        def open_cache(create):
            return objective.open_hidden_cache(path, lengths, key, create)
    else:
        size = HiddenStateCache.describe(lengths, verifier.hidden_size, verifier.dtype)

        def open_cache(create):
            return HiddenStateCache(path, lengths, verifier.hidden_size, verifier.dtype, create=create, key=key)
    if accelerator.is_main_process:
        accelerator.print(f"[specheads] hidden-state cache at {path}: {size}")
        cache = open_cache(True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        cache = open_cache(False)
    return cache


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        try:
            import tensorboardX  # noqa: F401

            return True
        except ImportError:
            return False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v if v is not None else "none"
        else:
            out[key] = str(v)
    return out
