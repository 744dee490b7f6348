"""One explicit accelerate training loop for every drafter kind.

setup (verifier, data, objective, optimizer, schedule) -> resume if asked -> train with
periodic logging, evaluation and checkpoints -> final drafter checkpoint. The same script runs
on one process, DDP, FSDP or DeepSpeed: ``accelerate launch`` picks the backend.

Steps: ``max_steps``, ``eval_every``, ``save_every``, ``log_every`` and the schedule count
optimizer steps; each takes ``gradient_accumulation_steps`` micro-batches of ``batch_size``
(global) examples, and its loss is normalised over the whole step (``step_counts`` in train), so G
micro-batches of b give the same update as one batch of G*b.

Resume: ``save_state`` checkpoints hold model, optimizer, scheduler and RNG states, written only
between optimizer steps (no accumulated gradient is ever lost). The data order is a function of
(seed, micro-batch number), so a resumed run skips the batches already seen and then sees exactly
what an uninterrupted run would have. Each checkpoint records the recipe values this depends on
(``resume_fields``); ``--resume`` refuses a recipe that changed them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from ..errors import SpecHeadsError
from .batches import collate  # noqa: F401  (re-exported: the loop's batches)
from .recipe import Recipe

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
HISTORY_KEPT = 20  # history entries kept in checkpoints and in training_summary.json
# What --resume --force may change: where training stops and what it reports, never what a step
# computes from the data (max_steps does re-stretch the cosine schedule from the resumed step on).
SAFE_TO_CHANGE = ("training.max_steps", "training.eval_every", "training.save_every", "training.log_every")
# Not recorded at all: where files go, and the hidden-state cache, which changes no value.
_NOT_RECORDED = ("training.output_dir", "training.cache_hidden_states", "training.hidden_cache_dir", "verifier.trust_remote_code")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _latest_checkpoint(output_dir: str, warn=print) -> tuple[str, int, dict] | None:
    """(path, step, trainer state) of the newest whole checkpoint; damaged ones are skipped, said."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"step-(\d+)", d))]
    for step, d in sorted(steps, reverse=True):
        path = os.path.join(root, d)
        state, problem = _read_trainer_state(path, step)
        if state is not None:
            return path, step, state
        warn(f"[specheads] --resume: skipping checkpoint {path}: {problem}")
    return None


def _read_trainer_state(path: str, step: int) -> tuple[dict | None, str | None]:
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None, f"incomplete (no {TRAINER_STATE})"
    except (OSError, ValueError) as exc:
        return None, f"unreadable {TRAINER_STATE} ({exc})"
    if not isinstance(state, dict) or state.get("step") != step:
        return None, f"{TRAINER_STATE} does not record step {step}"
    for rel, size in (state.get("files") or {}).items():
        full = os.path.join(path, rel)
        actual = os.path.getsize(full) if os.path.isfile(full) else None
        if actual != size:
            return None, f"{rel} is {'missing' if actual is None else f'{actual} bytes'}, {size} bytes were written"
    return state, None


def resume_fields(recipe: Recipe, train_examples: int) -> dict:
    """The recipe values a checkpoint's meaning depends on, as ``section.key``: the verifier, the
    data and its order (data settings, example count, batch size, accumulation, seed), the
    drafter's shapes, the objective, the optimizer and schedule, and the cadence. Every training
    setting is in unless listed in ``_NOT_RECORDED``, so a new one is checked by default."""
    fields = {k: v for k, v in _leaves(asdict(recipe)).items() if k not in _NOT_RECORDED}
    fields["data.train_examples"] = int(train_examples)
    return fields


def _fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _leaves(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as flat ``a.b.c`` keys, values made what JSON gives back (tuples as lists)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))
    return out


def _default_fields() -> dict:
    """Every recipe key at its default, optional sections included, for settings newer than a
    checkpoint: one it does not record is unchanged while at its default."""
    from .recipe import _SECTIONS

    def walk(cls, prefix):
        out = {}
        for f in dataclasses.fields(cls):
            sub = _SECTIONS.get((cls, f.name))
            if sub is not None:
                out.update(walk(sub, f"{prefix}{f.name}."))
            if sub is None or f.default is None:  # a leaf, or an optional section left out
                value = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                out[f"{prefix}{f.name}"] = None if dataclasses.is_dataclass(value) else json.loads(json.dumps(value, default=str))
        return out

    return walk(Recipe, "")


_ABSENT = object()


def _check_resume(path: str, saved: dict, fields: dict, force: bool) -> list[str]:
    """Refuse to resume ``saved`` under a recipe that changed what it depends on; returns the
    accepted (--force, safe) changes as "key: old → new"."""
    record = saved.get("resume") if isinstance(saved.get("resume"), dict) else {}
    old = record.get("values")
    if not isinstance(old, dict):
        raise SpecHeadsError(f"--resume: checkpoint {path} records no recipe fingerprint (written before specheads checked "
                             "resumes), so whether this recipe matches it cannot be told; train into a fresh training.output_dir")
    if record.get("hash") == _fingerprint(fields):
        return []
    defaults = _default_fields()
    changed = []
    for key in sorted(set(old) | set(fields)):
        was, now = old.get(key, _ABSENT), fields.get(key, _ABSENT)
        if was == now or (was is _ABSENT and key in defaults and now == defaults[key]):
            continue
        changed.append(key)

    def show(v):
        return "(not set)" if v is _ABSENT else json.dumps(v)

    diff = [f"{k}: {show(old.get(k, _ABSENT))} → {show(fields.get(k, _ABSENT))}" for k in changed]
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
    if unsafe:
        raise SpecHeadsError(
            f"--resume: the recipe differs from the one that wrote {path}: {'; '.join(diff)}. "
            f"{', '.join(unsafe)} change{'s' if len(unsafe) == 1 else ''} what the checkpoint means (data order, shapes, "
            "loss or schedule), so it cannot be continued" + (", not even with --force" if force else "")
            + ": restore the old values or train into a fresh training.output_dir "
            f"(--force accepts changes to {', '.join(SAFE_TO_CHANGE)} only)")
    if changed and not force:
        raise SpecHeadsError(f"--resume: the recipe differs from the one that wrote {path}: {'; '.join(diff)}. "
                             "Rerun with --resume --force to accept this change")
    return diff


def train(recipe: Recipe, *, resume: bool = False, force: bool = False, verifier=None, datasets=None, progress: bool = True,
          data_only: bool = False) -> str:
    """Run a recipe; returns the path of the final drafter checkpoint.

    ``verifier`` and ``datasets`` (train, eval) may be passed in (tests, notebooks); by default
    they come from the recipe. ``data_only`` stops once the data is ready (self-distilled and
    split) and returns its folder: generate on many processes first, train later. ``force``
    (with ``resume``) accepts a checkpoint whose recipe differs in ``SAFE_TO_CHANGE`` values only.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from ..verifier import load_verifier
    from .objectives import check_recipe_for_verifier, make_objective

    t = recipe.training
    if force and not resume:
        raise SpecHeadsError("--force only applies with --resume (it accepts a changed training.max_steps or cadence)")
    os.makedirs(t.output_dir, exist_ok=True)
    log_with = "tensorboard" if _has_tensorboard() else None
    G = t.gradient_accumulation_steps
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        # Without CUDA accelerate picks no process-group backend for DeepSpeed and every rank
        # believes it is the only one (while DeepSpeed runs a 2-rank world); gloo makes it see them all.
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(gradient_accumulation_steps=G, log_with=log_with, project_dir=t.output_dir, kwargs_handlers=handlers)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() != accelerator.num_processes:
        raise SpecHeadsError(f"accelerate sees {accelerator.num_processes} process(es) but torch.distributed runs {torch.distributed.get_world_size()}: "
                             "check the launch configuration (backend, ACCELERATE_USE_CPU)")
    set_seed(t.seed)
    main = accelerator.is_main_process

    if verifier is None:
        with _loaded_whole():
            verifier = load_verifier(recipe.verifier.name, dtype=recipe.verifier.dtype, device=accelerator.device, trust_remote_code=recipe.verifier.trust_remote_code)
    check_recipe_for_verifier(recipe, verifier)
    if datasets is None:
        from .pipeline import prepare_datasets

        datasets = prepare_datasets(recipe, verifier, accelerator)
    train_ds, eval_ds = datasets
    if len(train_ds) == 0:
        raise SpecHeadsError("the training dataset is empty")
    if data_only:
        where = recipe.data.conversations or recipe.data.self_distill.output_dir
        if main and progress:
            print(f"[specheads] data ready: {len(train_ds)} train + {len(eval_ds)} eval conversations from {where}", flush=True)
        accelerator.end_training()
        return str(where)

    fields = resume_fields(recipe, len(train_ds))
    fingerprint = {"hash": _fingerprint(fields), "values": fields}
    found = None
    if resume:  # checked before anything is built: a changed drafter shape is named, not a load_state traceback
        found = _latest_checkpoint(t.output_dir, warn=accelerator.print)
        if found is None:
            accelerator.print(f"[specheads] --resume: no checkpoint in {t.output_dir}/{CHECKPOINTS}, starting fresh")
        else:
            path, start, saved = found
            for change in _check_resume(path, saved, fields, force):
                accelerator.print(f"[specheads] --resume --force: accepted {change}")
            if start >= t.max_steps:
                raise SpecHeadsError(f"--resume: checkpoint {path} is at step {start}, not before training.max_steps={t.max_steps}: nothing left to train")

    objective = make_objective(recipe, verifier, train_ds)
    if t.cache_hidden_states:
        objective.hidden_cache = _open_hidden_cache(accelerator, objective, train_ds, verifier, t)
    module = objective.module.to(accelerator.device)
    groups = objective.param_groups(module, t.lr, t.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    num_groups = len(groups)
    # Built over optimizer steps and stepped once per optimizer step.
    base = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    if t.lora is not None and t.lora.heads_warmup_steps:
        # Medusa-2: the adapters' learning rate stays 0 until the heads have warmed up.
        warm = t.lora.heads_warmup_steps
        lambdas = [base.lr_lambdas[0]] + [lambda s, w=warm: 0.0 if s < w else min(1.0, (s - w + 1) / max(1, t.warmup_steps)) for _ in range(num_groups - 1)]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    else:
        scheduler = base

    pad_id = (verifier.eos_token_ids or [0])[0]
    P, rank = accelerator.num_processes, accelerator.process_index
    per_process = t.batch_size // P
    if per_process < 1 or per_process * P != t.batch_size:
        raise SpecHeadsError(f"training.batch_size={t.batch_size} must be a multiple of the {P} processes")
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None:  # we batch ourselves, so DeepSpeed's "auto" batch sizes are filled in here
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = per_process
        ds.deepspeed_config["gradient_accumulation_steps"] = G
        ds.deepspeed_config["train_batch_size"] = t.batch_size * G
    # The scheduler stays unprepared: accelerate would step it once per process, and the schedule
    # must be the same on 1 or N processes. It is still saved and restored with the state.
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    # DDP all-reduces gradients only after its own forward ran; an objective may call the wrapped
    # module's parts directly (Medusa's heads do), and then each process would train its own copy.
    ddp = module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else None
    ddp_forwards = [0]
    if ddp is not None:
        ddp.register_forward_pre_hook(lambda *_: ddp_forwards.__setitem__(0, ddp_forwards[0] + 1))

    start_step = 0
    history: list[dict] = []
    if found is not None:
        path, start_step, saved = found
        accelerator.load_state(path)
        history = list(saved.get("history") or [])
        accelerator.print(f"[specheads] resumed from {path} (step {start_step})")

    micro_per_epoch = math.ceil(len(train_ds) / t.batch_size)
    orders: dict[int, list[int]] = {}

    def micro_batch(m: int) -> tuple[int, dict, bool]:
        """(epoch, this process's share, real) of the run's m-th micro-batch: a function of (seed, m)
        only, so a resumed run, or G micro-batches of b against one of G*b, see the same examples."""
        epoch, offset = divmod(m, micro_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order(len(train_ds), t.seed, epoch)
        idx = orders[epoch][offset * t.batch_size : (offset + 1) * t.batch_size]
        # Each process takes its slice of the global batch (a short last one is spread evenly).
        mine = idx[rank * len(idx) // P : (rank + 1) * len(idx) // P]
        real = bool(mine)
        if not real:  # nothing left for this process: a zero-weight stand-in keeps it in every collective
            mine = idx[:1]
        batch = {k: v.to(accelerator.device) for k, v in collate([train_ds[i] for i in mine], pad_id, mine).items()}
        return epoch, batch, real

    def live_normalize(weight: float):
        def normalize(count):
            # Each process divides by its share of the global count, so DDP's gradient average
            # equals the single-process gradient of the global batch.
            count = count.detach() * weight
            if P == 1:
                return count
            return accelerator.reduce(count, reduction="sum") / P
        return normalize

    def step_normalize(totals: torch.Tensor):
        calls = itertools.count()

        def normalize(count):
            j = next(calls)
            if j >= len(totals):
                raise SpecHeadsError("the objective's loss asked for more counts than when the step was counted: it must be deterministic")
            return totals[j].to(count.device, count.dtype) / P
        return normalize

    def step_counts(micro) -> torch.Tensor:
        """Global count of each ``normalize`` call (the i-th call of every micro-batch: one loss
        term) over the whole optimizer step. A micro-batch's gradient must be divided by these,
        known only after all G micro-batches are seen, so they are counted first by a gradient-free
        pass (one extra forward per micro-batch), under a forked RNG so that the real pass draws
        what it would have."""
        per_call: list[torch.Tensor] = []
        devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for _, batch, real in micro:
                calls: list[torch.Tensor] = []

                def record(count):
                    calls.append(count.detach().float().reshape(()) * float(real))
                    return count

                objective.loss(module, batch, normalize=record)
                for j, c in enumerate(calls):
                    if j < len(per_call):
                        per_call[j] = per_call[j] + c
                    else:
                        per_call.append(c)
        totals = torch.stack(per_call).to(accelerator.device) if per_call else torch.zeros(0, device=accelerator.device)
        if P > 1:
            n = int(accelerator.gather(torch.tensor([len(totals)], device=accelerator.device)).max())
            totals = torch.cat([totals, totals.new_zeros(n - len(totals))])
            totals = accelerator.reduce(totals, reduction="sum")
        return totals

    eval_loader = DataLoader(eval_ds, batch_size=per_process, collate_fn=lambda b: collate(b, pad_id))
    eval_loader = accelerator.prepare_data_loader(eval_loader, device_placement=True) if P > 1 else eval_loader

    if main:
        accelerator.init_trackers("specheads", config=_flat(asdict(recipe)))
    bar = tqdm(total=t.max_steps, initial=start_step, desc="training", disable=not (progress and main))
    step = start_step
    last_eval: dict = {}
    started = time.perf_counter()
    module.train()
    while step < t.max_steps:
        micro = [micro_batch(step * G + g) for g in range(G)]
        epoch = micro[-1][0]
        totals = step_counts(micro) if G > 1 else None
        ddp_forwards[0] = 0
        accelerator.step = 0  # accelerate counts micro-batches itself: it syncs on the G-th of this step
        step_loss = torch.zeros((), device=accelerator.device)
        metrics: dict[str, float] = {}
        for _, batch, real in micro:
            weight = 1.0 if real else 0.0
            with accelerator.accumulate(module):
                loss, parts = objective.loss(module, batch, normalize=live_normalize(weight) if totals is None else step_normalize(totals))
                loss = loss * weight
                # Each loss is already its share of the whole step's mean; accelerate (and DeepSpeed's
                # engine) divide it by G once more, which this undoes.
                accelerator.backward(loss * G)
                if accelerator.sync_gradients and ddp is not None and not ddp_forwards[0]:
                    _average_gradients(list(module.parameters()), P)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(module.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            step_loss = step_loss + loss.detach()
            if real:  # the objective's terms are shares of the step's mean too: they add up
                for k, v in parts.items():
                    metrics[k] = metrics.get(k, 0.0) + v
        if not accelerator.sync_gradients:
            raise RuntimeError(f"internal: accelerate did not sync gradients after {G} micro-batches")
        scheduler.step()
        step += 1
        bar.update(1)
        if step % t.log_every == 0 or step == t.max_steps:
            mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
            metrics.update({"loss": mean_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch})
            accelerator.log(metrics, step=step)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            history.append({"step": step, **metrics})
        if step % t.eval_every == 0 or step == t.max_steps:
            result = evaluate(objective, module, eval_loader, accelerator)
            accelerator.log(result, step=step)
            history.append({"step": step, **result})
            accelerator.print(f"[specheads] step {step}: " + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in result.items() if "rank" not in k))
            last_eval = result
            module.train()
        if step % t.save_every == 0 and step < t.max_steps:
            save_checkpoint(accelerator, objective, module, t.output_dir, step,
                            {"step": step, "history": history[-HISTORY_KEPT:], "resume": fingerprint})
    bar.close()
    elapsed = time.perf_counter() - started
    final = os.path.join(t.output_dir, "drafter")
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(module)  # collective: gathers ZeRO-3 / FSDP shards on the main process
    if main:
        info = {"steps": step, "train_seconds": elapsed, "peak_memory": peak_memory(accelerator.device), "history": history[-HISTORY_KEPT:], "recipe": asdict(recipe)}
        if t.lora is not None:
            _save_tuned_verifier(accelerator, objective, module, verifier, os.path.join(t.output_dir, "verifier"))
        # The final held-out evaluation travels with the drafter (Medusa's data-driven trees read it).
        objective.save(state, final, training={"steps": step, "train_seconds": elapsed, "eval": last_eval})
        _write_json_atomic(os.path.join(t.output_dir, "training_summary.json"), info)
        accelerator.print(f"[specheads] trained {step} steps in {elapsed:.0f} s; peak memory " + ", ".join(f"{k} {v:.0f} MiB" for k, v in info["peak_memory"].items()))
        accelerator.print(f"[specheads] drafter checkpoint: {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


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


def save_checkpoint(accelerator, objective, module, output_dir: str, step: int, trainer_state: dict) -> None:
    """Training state and a loadable drafter for this step, published only once whole and on disk.

    Everything is written into ``.step-N.tmp``, fsynced, then renamed to ``step-N`` (and the parent
    fsynced): a kill at any instant leaves the earlier checkpoints untouched and either no
    ``step-N`` or a whole one. trainer_state.json, written last, lists every file's size, which
    ``_latest_checkpoint`` checks before trusting a checkpoint.
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp")
    old = os.path.join(root, f".step-{step}.old")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for entry in os.listdir(root):  # leftovers of a run killed mid-save: never read, so removed
            if re.fullmatch(r"\.step-\d+\.(tmp|old)", entry):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its RNG state into tmp before it is published
    state = accelerator.get_state_dict(module)  # collective, see train()
    if accelerator.is_main_process:
        objective.save(state, os.path.join(tmp, "drafter"))
        files = {}
        for folder, _, names in os.walk(tmp):
            for name in names:
                full = os.path.join(folder, name)
                files[os.path.relpath(full, tmp)] = os.path.getsize(full)
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump({**trainer_state, "step": step, "files": files}, f)
        _fsync_tree(tmp)  # contents on disk before the rename makes them the checkpoint
        if os.path.lexists(final):  # a step saved again: the old copy is set aside (ignored) until the new one is in
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tuned_verifier(accelerator, objective, module, verifier, path: str) -> None:
    """Medusa-2: merge the LoRA adapters and save the adapted verifier the heads were trained with."""
    from ..checkpoint import atomic_directory

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
    drafter reads its LM head. transformers partitions any model loaded while a ZeRO-3 config is
    registered, so the registration is lifted for the load."""
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
    path = t.hidden_cache_dir or os.path.join(t.output_dir, "hidden_cache")
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
