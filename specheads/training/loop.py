"""One explicit accelerate training loop for every drafter kind.

setup (verifier, data, objective, optimizer, schedule) -> resume if asked -> train with
periodic logging, evaluation and checkpoints -> final drafter checkpoint. The same script runs
on one process, DDP, FSDP or DeepSpeed: ``accelerate launch`` picks the backend.

Resume: ``save_state`` checkpoints hold model, optimizer, scheduler and RNG states; the data
order is a function of (seed, epoch), so a resumed run skips the batches already seen and then
sees exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
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
from .recipe import Recipe

CHECKPOINTS = "checkpoints"


def collate(batch: list[dict], pad_id: int, indices: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad input_ids; answer_mask marks answer tokens (the ones losses may target);
    ``index`` (the examples' dataset indices) lets the hidden-state cache find them."""
    T = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    answer = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        attn[i, :n] = 1
        answer[i, x["prompt_length"] : n] = 1
    out = {"input_ids": ids, "attention_mask": attn, "answer_mask": answer}
    if indices is not None:
        out["index"] = torch.tensor(indices, dtype=torch.long)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _latest_checkpoint(output_dir: str) -> tuple[str, int] | None:
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"step-(\d+)", d))]
    for step, d in sorted(steps, reverse=True):
        path = os.path.join(root, d)
        if os.path.isfile(os.path.join(path, "trainer_state.json")):  # written last: the checkpoint is whole
            return path, step
    return None


def train(recipe: Recipe, *, resume: bool = False, verifier=None, datasets=None, progress: bool = True,
          data_only: bool = False) -> str:
    """Run a recipe; returns the path of the final drafter checkpoint.

    ``verifier`` and ``datasets`` (train, eval) may be passed in (tests, notebooks); by default
    they come from the recipe. ``data_only`` stops once the data is ready (self-distilled and
    split) and returns its folder: generate on many processes first, train later.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from ..verifier import load_verifier
    from .objectives import check_recipe_for_verifier, make_objective

    t = recipe.training
    os.makedirs(t.output_dir, exist_ok=True)
    log_with = "tensorboard" if _has_tensorboard() else None
    accelerator = Accelerator(gradient_accumulation_steps=t.gradient_accumulation_steps, log_with=log_with, project_dir=t.output_dir)
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

    objective = make_objective(recipe, verifier, train_ds)
    if t.cache_hidden_states:
        objective.hidden_cache = _open_hidden_cache(accelerator, train_ds, verifier, t)
    module = objective.module.to(accelerator.device)
    groups = objective.param_groups(module, t.lr, t.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    num_groups = len(groups)
    base = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    if t.lora is not None and t.lora.heads_warmup_steps:
        # Medusa-2: the adapters' learning rate stays 0 until the heads have warmed up.
        warm = t.lora.heads_warmup_steps
        lambdas = [base.lr_lambdas[0]] + [lambda s, w=warm: 0.0 if s < w else min(1.0, (s - w + 1) / max(1, t.warmup_steps)) for _ in range(num_groups - 1)]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    else:
        scheduler = base

    pad_id = (verifier.eos_token_ids or [0])[0]
    per_process = t.batch_size // accelerator.num_processes
    if per_process < 1 or per_process * accelerator.num_processes != t.batch_size:
        raise SpecHeadsError(f"training.batch_size={t.batch_size} must be a multiple of the {accelerator.num_processes} processes")
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None:  # we batch ourselves, so DeepSpeed's "auto" batch sizes are filled in here
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = per_process
        ds.deepspeed_config["gradient_accumulation_steps"] = t.gradient_accumulation_steps
        ds.deepspeed_config["train_batch_size"] = t.batch_size * t.gradient_accumulation_steps
    # The scheduler stays unprepared: accelerate would step it once per process, and the schedule
    # must be the same on 1 or N processes. It is still saved and restored with the state.
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    if resume:
        found = _latest_checkpoint(t.output_dir)
        if found is None:
            accelerator.print(f"[specheads] --resume: no checkpoint in {t.output_dir}/{CHECKPOINTS}, starting fresh")
        else:
            path, start_step = found
            accelerator.load_state(path)
            accelerator.print(f"[specheads] resumed from {path} (step {start_step})")

    def normalize(count):
        # Each process divides by its share of the global row count, so DDP's gradient average
        # equals the single-process gradient of the global batch.
        if accelerator.num_processes == 1:
            return count
        return accelerator.reduce(count.detach(), reduction="sum") / accelerator.num_processes

    steps_per_epoch = math.ceil(len(train_ds) / t.batch_size)
    eval_loader = DataLoader(eval_ds, batch_size=per_process, collate_fn=lambda b: collate(b, pad_id))
    eval_loader = accelerator.prepare_data_loader(eval_loader, device_placement=True) if accelerator.num_processes > 1 else eval_loader

    if main:
        accelerator.init_trackers("specheads", config=_flat(asdict(recipe)))
    bar = tqdm(total=t.max_steps, initial=start_step, desc="training", disable=not (progress and main))
    step = start_step
    last_eval: dict = {}
    history: list[dict] = []
    started = time.perf_counter()
    module.train()
    while step < t.max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        order = epoch_order(len(train_ds), t.seed, epoch)
        for b in range(offset, steps_per_epoch):
            if step >= t.max_steps:
                break
            idx = order[b * t.batch_size : (b + 1) * t.batch_size]
            # Each process takes its slice of the global batch: same global batch on 1 or N processes.
            mine = idx[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
            if not mine:
                continue
            batch = {k: v.to(accelerator.device) for k, v in collate([train_ds[i] for i in mine], pad_id, mine).items()}
            with accelerator.accumulate(module):
                loss, metrics = objective.loss(module, batch, normalize=normalize)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(module.parameters(), t.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
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
                save_checkpoint(accelerator, objective, module, t.output_dir, step, history)
    bar.close()
    elapsed = time.perf_counter() - started
    final = os.path.join(t.output_dir, "drafter")
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(module)  # collective: gathers ZeRO-3 / FSDP shards on the main process
    if main:
        info = {"steps": step, "train_seconds": elapsed, "peak_memory": peak_memory(accelerator.device), "history": history[-20:], "recipe": asdict(recipe)}
        if t.lora is not None:
            _save_tuned_verifier(accelerator, objective, module, verifier, os.path.join(t.output_dir, "verifier"))
        # The final held-out evaluation travels with the drafter (Medusa's data-driven trees read it).
        objective.save(state, final, training={"steps": step, "train_seconds": elapsed, "eval": last_eval})
        with open(os.path.join(t.output_dir, "training_summary.json"), "w") as f:
            json.dump(info, f, indent=2)
        accelerator.print(f"[specheads] trained {step} steps in {elapsed:.0f} s; peak memory " + ", ".join(f"{k} {v:.0f} MiB" for k, v in info["peak_memory"].items()))
        accelerator.print(f"[specheads] drafter checkpoint: {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


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


def save_checkpoint(accelerator, objective, module, output_dir: str, step: int, history: list) -> None:
    """Training state and a loadable drafter for this step, made visible only once complete."""
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    state = accelerator.get_state_dict(module)  # collective, see train()
    if accelerator.is_main_process:
        objective.save(state, os.path.join(tmp, "drafter"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "history": history[-20:]}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


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


def _open_hidden_cache(accelerator, train_ds, verifier, t):
    from ..checkpoint import verifier_info
    from .hidden_cache import HiddenStateCache, cache_key

    if t.lora is not None:
        raise SpecHeadsError("training.cache_hidden_states needs a frozen verifier; it cannot be used with training.lora (Medusa-2)")
    rows = train_ds["input_ids"]
    lengths = [len(ids) for ids in rows]
    key = cache_key(verifier_info(verifier), rows)
    path = t.hidden_cache_dir or os.path.join(t.output_dir, "hidden_cache")
    if accelerator.is_main_process:
        accelerator.print(f"[specheads] hidden-state cache at {path}: {HiddenStateCache.describe(lengths, verifier.hidden_size, verifier.dtype)}")
        cache = HiddenStateCache(path, lengths, verifier.hidden_size, verifier.dtype, create=True, key=key)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        cache = HiddenStateCache(path, lengths, verifier.hidden_size, verifier.dtype, create=False, key=key)
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
