"""A memory and time plan for training a drafter on GPUs, from the verifier's config alone.

``specheads plan --recipe R`` answers what a user asks before renting 8 GPUs: does the frozen
verifier fit whole or must it be sharded, what the drafter and its optimizer state cost, how much
the activations of one sequence take at the recipe's length, how large a feature store would be
(features kept on disk) against taking them online, and how many tokens a GPU-hour trains and
regenerates. It reads no weights: parameter counts come from the model built on the meta device
(transformers' own classes, so MoE experts, tied heads and biases count exactly as they load).

Where the numbers come from:
- weights: parameters x bytes (bf16 verifier; the drafter's float32 weights, gradients and AdamW's
  two moments: 16 bytes a parameter, bf16 autocast as ``training.dtype: auto`` does);
- activations of one sequence of L tokens (batch 1), by what the code keeps alive:
  * verifier forward (no grad, online features): ``output_hidden_states`` keeps every layer's
    output (N + 1) x L x H, plus the logits L x V (argmax) and the widest MLP intermediate;
  * teacher targets: log-softmax over the draft vocabulary at answer positions, float32, and the
    copy the loss keeps for backward;
  * EAGLE-3 training-time test, per unrolled step: the attention scores of step 0's causal block
    are explicit (heads x L x L: bf16 scores, float32 softmax input and output, bf16 weights, kept
    for backward), the layer's linear activations, and the draft-vocabulary logits (bf16, float32
    log-softmax) at answer positions. The scores grow as L^2: at 4096 tokens they dominate;
  * answer positions are taken as ``answer_share`` of the tokens (0.6: ShareGPT-like chats).
- FLOPs per trained token: 2 x active verifier parameters (forward) + causal attention, plus
  6 x drafter parameters per TTT step (forward and backward) + its attention, plus the teacher's
  rows. Tokens per GPU-hour = peak bf16 FLOP/s x ``mfu`` / FLOPs per token.
- Regeneration through a serving engine (decode is memory-bound): one decode step of a batch of
  ``decode_batch`` reads the active weights once and each sequence's KV cache; tokens/s per GPU =
  batch / step time at ``hbm_efficiency`` of the memory bandwidth (an upper bound to check
  against the engine's own numbers).
The estimates are checked against a measured training step on this CPU (``docs/scale.md``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch

from .errors import SpecHeadsError

GIB = 2**30


@dataclass
class Hardware:
    name: str = "H100 80GB SXM"
    gpus: int = 8
    memory_gib: float = 80.0
    bf16_tflops: float = 989.0  # dense peak
    hbm_tbps: float = 3.35
    mfu: float = 0.25  # share of the peak a training step reaches (attention, small matmuls, gathers)
    hbm_efficiency: float = 0.6  # share of the bandwidth a decode step reaches


@dataclass
class ModelCounts:
    total: int  # parameters as loaded (a tied head counted once)
    active: int  # per token: MoE experts counted at experts_per_token / experts
    embedding: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int | None = None
    experts_per_token: int | None = None


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_config(name: str, trust_remote_code: bool = False):
    """The verifier's transformers config, without weights or network: a local folder's (remote
    code allowed as the user says), else what a tiny twin is scaled from (``tiny_twin.real_config``:
    the converted alias, the local Hugging Face cache, or the configs shipped for the recipes' hub ids)."""
    from transformers import AutoConfig

    from .tiny_twin import _model_config, real_config, shipped_configs

    if os.path.isdir(name):
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    try:
        return _model_config(real_config(name).config)
    except SpecHeadsError:
        raise SpecHeadsError(
            f"no config for verifier '{name}': not a local folder, not in the local Hugging Face cache, and not one of the "
            f"hub ids specheads ships configs for ({', '.join(sorted(shipped_configs()))}); point verifier.name "
            "at a local copy (huggingface-cli download ID --local-dir DIR)") from None


def count_parameters(config) -> ModelCounts:
    """Exact parameter counts of the model ``config`` describes, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = text_config(config)
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    per_token = getattr(cfg, "num_experts_per_tok", None)
    total = active = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        # Routed experts (not shared ones, which every token uses) are read at k / E per token.
        if experts and per_token and ".experts." in name + "." and "shared" not in name:
            active += n * per_token // experts
        else:
            active += n
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    return ModelCounts(
        total=total, active=active, embedding=model.get_input_embeddings().weight.numel(), layers=cfg.num_hidden_layers,
        hidden=hidden, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * hidden, vocab=cfg.vocab_size,
        experts=experts, experts_per_token=per_token,
    )


class _ConfigOnly:
    """What ``Eagle3Config.from_verifier`` reads of a verifier, from its config alone."""

    def __init__(self, config):
        self.config = config
        cfg = text_config(config)
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size


def eagle3_parameters(config, draft_vocab_size: int, num_layers: int = 1, aux_layer_ids=None) -> int:
    """Trained parameters of the EAGLE-3 drafter specheads builds for this verifier (the shared,
    frozen embedding not counted), built on the meta device from the real module."""
    from .drafters.eagle3 import Eagle3Config, Eagle3Model

    cfg = Eagle3Config.from_verifier(_ConfigOnly(config), draft_vocab_size, aux_layer_ids, num_layers)
    d2t = torch.zeros(draft_vocab_size, dtype=torch.long) if draft_vocab_size < cfg.vocab_size else None
    with torch.device("meta"):
        model = Eagle3Model(cfg, d2t=d2t)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("rotary."))


@dataclass
class Plan:
    verifier: str
    counts: dict
    drafter_kind: str
    drafter_params: int
    draft_vocab: int
    ttt_steps: int
    lengths: list[int]
    hardware: dict
    memory: dict = field(default_factory=dict)  # per length: the per-GPU terms in GiB
    feature_bytes_per_token: int = 0
    flops_per_token: dict = field(default_factory=dict)
    tokens_per_gpu_hour: dict = field(default_factory=dict)
    regeneration: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan(config, *, verifier: str, drafter_kind: str = "eagle3", draft_vocab_size: int = 32000, ttt_steps: int = 7,
         num_layers: int = 1, aux_layer_ids=None, lengths=(2048, 4096), hardware: Hardware | None = None,
         answer_share: float = 0.6, decode_batch: int = 64, answer_tokens: int = 512) -> Plan:
    hw = hardware or Hardware()
    c = count_parameters(config)
    n_aux = len(aux_layer_ids) if aux_layer_ids else 3
    vd = min(draft_vocab_size, c.vocab)
    if drafter_kind == "eagle3":
        dparams = eagle3_parameters(config, vd, num_layers, aux_layer_ids)
    else:
        raise SpecHeadsError(f"specheads plan covers drafter.kind eagle3 (the flagship), not {drafter_kind!r}")
    p = Plan(verifier=verifier, counts=asdict(c), drafter_kind=drafter_kind, drafter_params=dparams, draft_vocab=vd,
             ttt_steps=ttt_steps, lengths=list(lengths), hardware=asdict(hw))
    bf16 = 2
    G = hw.gpus
    verifier_whole = c.total * bf16
    layer_bytes = (c.total - c.embedding * (1 if _tied(config) else 2)) * bf16 / max(1, c.layers)
    drafter_state = dparams * 16
    for L in lengths:
        answers = answer_share * L
        # verifier forward under no_grad, output_hidden_states=True
        v_act = ((c.layers + 1) * L * c.hidden * bf16 + L * c.vocab * bf16 + 3 * L * c.intermediate * bf16)
        teacher = answers * vd * 4 * 2
        scores = c.heads * L * L * (2 + 4 + 4 + 2)  # explicit causal block of one TTT step, kept for backward
        linear = L * (8 * c.hidden + 3 * c.intermediate + n_aux * c.hidden) * bf16
        logits = answers * vd * (2 + 4 + 4)
        per_step = scores + linear + logits
        d_act = ttt_steps * per_step
        row = {
            "verifier_whole": verifier_whole / GIB,
            # a shard + the layer being gathered and the next one prefetched
            "verifier_sharded": min(verifier_whole, verifier_whole / G + 2 * layer_bytes) / GIB,
            "drafter_state_replicated": drafter_state / GIB,
            "drafter_state_sharded": drafter_state / G / GIB,
            "activations_verifier": v_act / GIB,
            "activations_teacher": teacher / GIB,
            "activations_drafter": d_act / GIB,
            "activations_drafter_scores": ttt_steps * scores / GIB,
        }
        row["total_whole_ddp"] = row["verifier_whole"] + row["drafter_state_replicated"] + row["activations_verifier"] + row["activations_teacher"] + row["activations_drafter"]
        row["total_sharded"] = row["verifier_sharded"] + row["drafter_state_sharded"] + row["activations_verifier"] + row["activations_teacher"] + row["activations_drafter"]
        row["fits_whole_ddp"] = row["total_whole_ddp"] <= hw.memory_gib * 0.92
        row["fits_sharded"] = row["total_sharded"] <= hw.memory_gib * 0.92
        p.memory[L] = row
        # FLOPs per trained token at this length (causal attention: the mean key count is L / 2)
        attn_v = 4 * c.layers * c.heads * c.head_dim * (L / 2)
        f_verifier = 2 * c.active + attn_v
        attn_d = 4 * c.heads * c.head_dim * (L / 2 + ttt_steps / 2)
        f_drafter = ttt_steps * 3 * (2 * (dparams - vd * c.hidden) + 2 * vd * c.hidden * answer_share + attn_d * num_layers)
        f_teacher = 2 * c.hidden * vd * answer_share
        p.flops_per_token[L] = {"verifier": f_verifier, "drafter": f_drafter, "teacher": f_teacher,
                                "online": f_verifier + f_drafter + f_teacher, "offline": f_drafter + f_teacher}
        rate = hw.bf16_tflops * 1e12 * hw.mfu * 3600
        p.tokens_per_gpu_hour[L] = {"online": rate / p.flops_per_token[L]["online"], "offline": rate / p.flops_per_token[L]["offline"]}
    p.feature_bytes_per_token = (n_aux + 1) * c.hidden * bf16 + 8
    # Regeneration: a decode step of B sequences reads the active weights once and B KV caches of
    # mean length (prompt + answer / 2). Tensor parallelism over n GPUs divides the bytes each GPU
    # reads by n and the step time with them, so tokens/s per GPU is B / (one-GPU step time).
    mean_len = 256 + answer_tokens / 2
    kv_per_token = 2 * c.layers * c.kv_heads * c.head_dim * bf16
    step_bytes = c.active * bf16 + decode_batch * mean_len * kv_per_token
    step_s = step_bytes / (hw.hbm_tbps * 1e12 * hw.hbm_efficiency)
    gpus_to_hold = max(1, math.ceil(c.total * bf16 / (hw.memory_gib * GIB * 0.6)))
    p.regeneration = {"decode_batch": decode_batch, "kv_bytes_per_token": kv_per_token,
                      "tokens_per_s_per_gpu": decode_batch / step_s,
                      "tensor_parallel_min": gpus_to_hold, "answer_tokens": answer_tokens}
    return p


def _tied(config) -> bool:
    return bool(getattr(text_config(config), "tie_word_embeddings", False))


def hours(tokens: float, per_gpu_hour: float) -> float:
    return tokens / per_gpu_hour


def format_plan(p: Plan, *, train_tokens: float | None = None, answers: int | None = None) -> str:
    """The plan as text: what a recipe header and docs/scale.md quote."""
    c = p.counts
    hw = p.hardware
    moe = f", {c['experts']} experts ({c['experts_per_token']} per token), {c['active'] / 1e9:.2f}B active" if c.get("experts") else ""
    lines = [
        f"verifier {p.verifier}: {c['total'] / 1e9:.2f}B parameters{moe}; {c['layers']} layers, hidden {c['hidden']}, vocab {c['vocab']}",
        f"drafter {p.drafter_kind}: {p.drafter_params / 1e6:.0f}M trained parameters (draft vocabulary {p.draft_vocab}, "
        f"{p.ttt_steps} TTT steps); hardware {hw['gpus']}x {hw['name']} ({hw['memory_gib']:.0f} GiB, {hw['bf16_tflops']:.0f} TFLOP/s bf16, MFU {hw['mfu']})",
        "",
        "per-GPU memory, GiB (batch 1 sequence per GPU)  | " + " | ".join(f"L={L}" for L in p.lengths),
    ]
    terms = [("frozen verifier, bf16, whole", "verifier_whole"), (f"frozen verifier, sharded over {hw['gpus']}", "verifier_sharded"),
             ("drafter weights+grads+AdamW, replicated (DDP)", "drafter_state_replicated"),
             (f"drafter weights+grads+AdamW, sharded over {hw['gpus']}", "drafter_state_sharded"),
             ("activations: verifier forward (online features)", "activations_verifier"),
             ("activations: teacher targets", "activations_teacher"),
             ("activations: drafter TTT (all steps kept)", "activations_drafter"),
             ("  of which attention scores (L^2)", "activations_drafter_scores"),
             ("total, verifier whole + DDP", "total_whole_ddp"), ("total, verifier + drafter sharded", "total_sharded")]
    for label, key in terms:
        lines.append(f"  {label:<47} | " + " | ".join(f"{p.memory[L][key]:.1f}" for L in p.lengths))
    lines.append(f"  {'fits (whole / sharded)':<47} | " + " | ".join(
        f"{'yes' if p.memory[L]['fits_whole_ddp'] else 'no'} / {'yes' if p.memory[L]['fits_sharded'] else 'no'}" for L in p.lengths))
    lines += ["", f"feature store (features kept on disk): {p.feature_bytes_per_token:,} bytes per token "
              f"({p.feature_bytes_per_token * 1e9 / 1e12:.1f} TB per billion tokens)"]
    for L in p.lengths:
        f = p.flops_per_token[L]
        t = p.tokens_per_gpu_hour[L]
        lines.append(f"L={L}: {f['online'] / 1e9:.1f} GFLOP per trained token online ({f['verifier'] / f['online']:.0%} the verifier's forward), "
                     f"{t['online'] / 1e6:.1f}M tokens per GPU-hour online, {t['offline'] / 1e6:.1f}M with stored features")
    r = p.regeneration
    lines.append(f"regeneration (serving engine, batch {r['decode_batch']}, memory-bound bound): ~{r['tokens_per_s_per_gpu']:,.0f} answer tokens/s per GPU"
                 + (f" (tensor parallel >= {r['tensor_parallel_min']})" if r["tensor_parallel_min"] > 1 else ""))
    if answers:
        gen_tokens = answers * r["answer_tokens"]
        gen_h = gen_tokens / r["tokens_per_s_per_gpu"] / 3600
        lines.append(f"  {answers:,} answers of ~{r['answer_tokens']} tokens: {gen_tokens / 1e6:.0f}M tokens, ~{gen_h:.0f} GPU-hours")
    if train_tokens:
        L = p.lengths[0]
        lines.append(f"training on {train_tokens / 1e6:.0f}M tokens per epoch at L={L}: ~{train_tokens / p.tokens_per_gpu_hour[L]['online']:.0f} GPU-hours "
                     f"an epoch online, ~{train_tokens / p.tokens_per_gpu_hour[L]['offline']:.0f} offline; a feature store of "
                     f"{train_tokens * p.feature_bytes_per_token / 1e12:.1f} TB")
    return "\n".join(lines)


def plan_for_verifier(name: str, hardware: Hardware | None = None, lengths=(2048, 4096), **kw) -> Plan:
    """The plan of the field's default EAGLE-3 drafter (one layer, a 32k draft vocabulary, 7 TTT
    steps, as SpecForge and the shipped GPU recipes train) for a verifier without a recipe."""
    return plan(load_config(name), verifier=name, lengths=lengths, hardware=hardware, **kw)


def plan_for_recipe(recipe, hardware: Hardware | None = None, lengths=None, **kw) -> Plan:
    """The plan of a training recipe: its verifier's config, drafter and lengths."""
    config = load_config(recipe.verifier.name, recipe.verifier.trust_remote_code)
    dr, o = recipe.drafter, recipe.objective
    L = lengths or sorted({recipe.data.max_length, 4096 if recipe.data.max_length < 4096 else 2 * recipe.data.max_length})
    return plan(config, verifier=recipe.verifier.name, drafter_kind=dr.kind, draft_vocab_size=dr.draft_vocab_size or text_config(config).vocab_size,
                ttt_steps=o.ttt_steps, num_layers=dr.num_layers, aux_layer_ids=dr.aux_layer_ids, lengths=L, hardware=hardware, **kw)
