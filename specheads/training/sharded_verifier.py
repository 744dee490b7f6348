"""The frozen verifier sharded across the training processes (recipe ``verifier.shard``).

EAGLE-3 and Medusa train on what the frozen verifier gives each batch; with
``training.cache_hidden_states: false`` that is one verifier forward per batch, inside training
("online" features, as SpecForge, ModelOpt and ArcticTraining compute them). A whole verifier on
every process costs its full size per GPU: 16 GB at 8B in bfloat16, and at 70B (141 GB) it fits no
80 GB GPU. ``verifier.shard`` splits every decoder layer across the N processes, each keeping 1/N
of it, and each forward gathers one layer at a time:

* ``fsdp``: PyTorch FSDP2, ``fully_shard`` on every decoder layer (resharded after its forward)
  and on the model with everything else left out (``ignored_params``);
* ``zero3``: DeepSpeed ZeRO-3 partitioning, ``deepspeed.zero.Init`` on every decoder layer, whose
  parameters ``GatheredParameters`` collects around its forward and partitions again after.

What the drafter reads of the verifier directly stays whole on every process, as plain tensors:
the input embeddings (EAGLE-3 embeds its tokens with them), the LM head (the target distribution,
the drafters' initial heads), the final norm, and every buffer (rotary tables). They are a few
percent of a large model (4.2 GB of Llama-3.1-70B's 141 GB in bfloat16).

Loading: process 0 loads the verifier (``load_verifier``, in host memory); the others build its
skeleton on the meta device from process 0's config files, and read its tokenizer from its files
too (so every process tokenizes alike). Then, layer by layer, process 0's weights are broadcast
and sharded: no process other than the first ever holds more than its shards and one layer, and
the first holds the whole model in host memory only until it is sharded. The hash of the whole
weights (``model_id.weights_sha256``, recorded in drafter checkpoints and feature stores) is taken
before sharding, so a sharded run's checkpoints and features name the same verifier as a whole one's.

A sharded forward is collective: every process must run it, as often as the others. The training
loop does (each process takes a slice of every batch, a stand-in when it has none; evaluation
batches are evened out by accelerate); an objective that may skip the forward (its features read
from the cache) asks ``all_agree`` first, so all run it or none does. Self-distillation with
transformers' generate does not: process c answers shard c mod N, so the processes run different
numbers of batches (generate itself runs on FSDP2 modules, in step across processes). It is
refused with a pointer to the serving engines.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SpecHeadsError

SHARD_MODES = ("none", "fsdp", "zero3")
_MARK = "_specheads_shard"  # attribute of a sharded model: its ShardInfo
_CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass
class ShardInfo:
    """How a verifier is sharded, and what this process holds of it."""

    mode: str
    processes: int
    device: torch.device
    held_bytes: int  # this process's shards plus the whole non-layer tensors
    whole_bytes: int  # the whole verifier
    unsharded_bytes: int  # the tensors kept whole (embeddings, head, norms, buffers)

    def describe(self) -> str:
        return (f"verifier.shard {self.mode}: decoder layers sharded over {self.processes} processes; this process holds "
                f"{_size(self.held_bytes)} of the verifier's {_size(self.whole_bytes)} (embeddings, final norm, LM head and "
                f"buffers whole: {_size(self.unsharded_bytes)})")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_recipe(recipe) -> None:
    """Refuse ``verifier.shard`` values and combinations that cannot work, before anything loads."""
    mode = recipe.verifier.shard
    if mode not in SHARD_MODES:
        raise SpecHeadsError(f"recipe value verifier.shard={mode!r} is not a sharding mode (choose {', '.join(SHARD_MODES)})")
    if mode == "none":
        return
    if recipe.training.lora is not None:
        raise SpecHeadsError(f"verifier.shard={mode} shards a frozen verifier, and training.lora (Medusa-2) trains the verifier: "
                             "leave verifier.shard at none with training.lora (the tuned verifier is wrapped with the heads)")
    if recipe.drafter.kind == "draft_model":
        raise SpecHeadsError(f"verifier.shard={mode} is for drafters that read the verifier's features (eagle3, medusa); "
                             "drafter.kind=draft_model builds its student from the whole verifier: leave verifier.shard at none")


def sharded(model) -> ShardInfo | None:
    """How ``model`` is sharded, or None for a whole model."""
    return model.__dict__.get(_MARK)


def all_agree(model, flag: bool) -> bool:
    """``flag`` where it holds on every process of ``model``'s sharded forward, else False; for a
    whole model ``flag`` itself. A sharded forward runs on all processes or on none, so a caller
    that may skip it (its features read from a cache) asks this, on every process, first."""
    info = sharded(model)
    if info is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# -- loading ------------------------------------------------------------------------------------
def load_sharded_verifier(section, accelerator):
    """The recipe's verifier (``section``: its ``verifier`` section), sharded over the processes
    of ``accelerator`` as ``section.shard`` says (see the module docstring)."""
    import torch.distributed as dist

    from ..model_id import weights_sha256
    from ..verifier import choose_dtype, load_verifier, native_bf16

    device, rank = accelerator.device, accelerator.process_index
    # "auto" is decided for the device that computes, not for the host memory process 0 loads into.
    torch_dtype, dtype_choice = choose_dtype(section.dtype, device)
    payload: dict = {}
    whole = failure = None
    if rank == 0:
        try:
            whole = load_verifier(section.name, dtype=torch_dtype, device="cpu", float32_head=False,
                                  trust_remote_code=section.trust_remote_code, native=lambda _: native_bf16(device))
            payload = {"files": _model_files(whole), "name": whole.name, "weights_sha256": weights_sha256(whole.model)}
        except Exception as exc:  # every process stops with it, instead of waiting for process 0
            failure = exc
            payload = {"error": str(exc) if isinstance(exc, SpecHeadsError) else f"process 0 could not load verifier "
                       f"'{section.name}': {type(exc).__name__}: {exc}"}
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    payload = box[0]
    if failure is not None:
        raise failure
    if "error" in payload:
        raise SpecHeadsError(payload["error"])
    with tempfile.TemporaryDirectory(prefix="specheads-verifier-") as tmp:
        for name, data in payload["files"].items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        tokenizer = _tokenizer_from(tmp, section.trust_remote_code)
        model = whole.model if whole is not None else _skeleton(tmp, torch_dtype, section.trust_remote_code)
    del whole
    from ..verifier import Verifier

    verifier = Verifier(model=model, tokenizer=tokenizer, name=payload["name"], dtype_choice=dtype_choice)
    _shard(model, section.shard, accelerator, payload["weights_sha256"])
    return verifier


def shard_verifier(verifier, mode: str, accelerator):
    """Shard a verifier every process already holds whole (passed in by a test or a notebook):
    process 0's weights are the ones kept."""
    import torch.distributed as dist

    from ..model_id import weights_sha256

    box = [weights_sha256(verifier.model) if accelerator.process_index == 0 else None]
    dist.broadcast_object_list(box, src=0)
    _shard(verifier.model, mode, accelerator, box[0])
    return verifier


def _model_files(verifier) -> dict[str, bytes]:
    """The config, generation config and tokenizer files of a loaded verifier (a few MB)."""
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="specheads-verifier-") as tmp:
        verifier.model.config.save_pretrained(tmp)
        if getattr(verifier.model, "generation_config", None) is not None:
            verifier.model.generation_config.save_pretrained(tmp)
        if verifier.tokenizer is not None:
            verifier.tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[name] = f.read()
    return out


def _tokenizer_from(folder: str, trust_remote_code: bool):
    if set(os.listdir(folder)) <= set(_CONFIG_FILES):
        return None  # a verifier without a tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None  # as load_verifier: models without a tokenizer still decode token ids


def _skeleton(folder: str, dtype: torch.dtype, trust_remote_code: bool):
    """The verifier's modules on the meta device (no memory), from its config files."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


# -- sharding -----------------------------------------------------------------------------------
def decoder_layers(model) -> nn.ModuleList:
    """The model's list of decoder layers (the outermost module list as long as the model is deep)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    depth = getattr(cfg, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if not depth or not found:
        raise SpecHeadsError(f"verifier.shard: {type(model).__name__} has no list of its {depth} decoder layers to shard")
    return min(found, key=lambda item: item[0].count("."))[1]


def _shard(model, mode: str, accelerator, whole_sha256: str) -> None:
    """Shard ``model``'s decoder layers in place over the processes, process 0's weights broadcast
    (the others' may be on the meta device); everything else made whole on every process."""
    if mode not in ("fsdp", "zero3"):
        raise SpecHeadsError(f"internal: no sharding mode {mode!r}")
    from ..model_id import WHOLE_WEIGHTS_SHA256

    device, rank = accelerator.device, accelerator.process_index
    model.requires_grad_(False)
    model.eval()
    layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    whole_bytes = sum(_nbytes(t) for t in _tensors(model))
    kept: dict = {}
    for module in model.modules():
        if id(module) not in inside:
            _broadcast_own(module, device, rank, kept)
    unsharded = sum(_nbytes(new) for _, new in kept.values())
    if mode == "fsdp":
        _fsdp(model, layers, kept, device, rank, accelerator.num_processes)
    else:
        _zero3(layers, device, rank, model.dtype if hasattr(model, "dtype") else next(model.parameters()).dtype)
    model.__dict__[WHOLE_WEIGHTS_SHA256] = whole_sha256
    held = unsharded + sum(_local_nbytes(p) for p in layers.parameters()) + sum(_nbytes(b) for b in layers.buffers())
    model.__dict__[_MARK] = ShardInfo(mode, accelerator.num_processes, torch.device(device), held, whole_bytes, unsharded)
    model.generate = _refuse_generate(mode)


def _fsdp(model, layers, kept, device, rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world,))
    for layer in layers:
        memo: dict = {}
        for module in layer.modules():  # the whole layer on every process, briefly
            _broadcast_own(module, device, rank, memo)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # The root wraps the layers so that they are not roots themselves (FSDP2 keeps a root's
    # parameters gathered after forward); everything outside them stays whole and unmanaged.
    outside = {p for _, p in kept.values() if isinstance(p, nn.Parameter)}
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=outside)


def _zero3(layers, device, rank: int, dtype: torch.dtype) -> None:
    try:
        import deepspeed
    except ImportError as exc:
        raise SpecHeadsError(f"verifier.shard=zero3 needs DeepSpeed (pip install deepspeed): {exc}") from exc
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    for layer in layers:
        _materialize(layer, device, rank)
        memo: dict = {}
        for module in layer.modules():  # buffers and tensor attributes; zero.Init broadcasts the parameters
            _broadcast_own(module, device, rank, memo, parameters=False)
        # mem_efficient_linear off: it would replace torch's linear for the whole process
        deepspeed.zero.Init(module=layer, config_dict_or_path=config, mem_efficient_linear=False, dtype=dtype)
        gathered: list = []

        def gather(module, args, gathered=gathered):
            context = deepspeed.zero.GatheredParameters(list(module.parameters()))
            context.__enter__()
            gathered.append(context)

        def release(module, args, output, gathered=gathered):
            gathered.pop().__exit__(None, None, None)
            return output

        layer.register_forward_pre_hook(gather)
        layer.register_forward_hook(release)


def _materialize(module, device, rank: int) -> None:
    """Process 0's layer moved to the device; the others' allocated there (filled by broadcast)."""
    if rank == 0:
        module.to(device)
    else:
        module.to_empty(device=device)


def _broadcast_own(module, device, rank: int, memo: dict, parameters: bool = True) -> None:
    """Make ``module``'s own parameters, buffers and tensor attributes (a rotary table kept beside
    its buffer) process 0's, on ``device``, on every process. ``memo`` maps a tensor already done
    (tied weights) to (that tensor, kept alive so that its id is not reused, and its replacement)."""
    import torch.distributed as dist

    def whole(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            data = t.detach().to(device).contiguous() if rank == 0 else torch.empty(t.shape, dtype=t.dtype, device=device)
            dist.broadcast(data, 0)
            memo[id(t)] = (t, nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data)
        return memo[id(t)][1]

    if parameters:
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = whole(p)
    for name, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[name] = whole(b)
    for name in sorted(k for k, v in vars(module).items() if type(v) is torch.Tensor):
        module.__dict__[name] = whole(module.__dict__[name])


def _tensors(model):
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    return seen.values()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _local_nbytes(p: torch.Tensor) -> int:
    """Bytes of a sharded parameter held here: an FSDP2 DTensor's local shard, a ZeRO-3 partition."""
    if hasattr(p, "ds_tensor"):
        return _nbytes(p.ds_tensor)
    if hasattr(p, "to_local"):
        return _nbytes(p.to_local())
    return _nbytes(p)


def _refuse_generate(mode: str):
    def generate(*args, **kwargs):
        raise SpecHeadsError(
            f"self-distillation with transformers' generate (data.self_distill.engine hf) cannot run on a sharded verifier "
            f"(verifier.shard={mode}): every forward of a sharded verifier runs on all processes together, while each process "
            f"answers its own shards of prompts. Write the answers with a serving engine (data.self_distill.engine: openai or "
            f"vllm), or first with --data-only and verifier.shard: none, then train with the shard (the data folder is reused)")
    return generate
