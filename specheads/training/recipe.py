"""Training recipes: a YAML file read into typed, validated sections.

A recipe names the verifier, the drafter and its hyper-parameters, the data, the objective and
the loop settings. ``--set section.key=value`` overrides any value from the command line. Every
value is checked here, so a bad value fails before any model is loaded, naming key and value.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import SpecHeadsError


@dataclass
class VerifierSection:
    name: str = "smollm2-135m"
    # auto: bfloat16 where the hardware does it natively (its features, self-distillation and
    # teacher distributions 3x faster on an AVX512-BF16 CPU than in float32), float32 elsewhere
    dtype: str = "auto"
    trust_remote_code: bool = False
    # Several processes: none = the frozen verifier whole on each; fsdp (FSDP2) / zero3 (DeepSpeed
    # ZeRO-3) = its decoder layers sharded across them, gathered a layer at a time for each forward
    # (training.sharded_verifier). One process: no effect.
    shard: str = "none"


STUDENT_SOURCES = ("verifier_layers", "model", "config")


@dataclass
class StudentSection:
    """Where a draft model (``drafter.kind: draft_model``) starts from.

    verifier_layers: a subset of the verifier's decoder layers (``layers``: every:M, first:L, a
    comma list or a YAML list), with its embeddings, final norm and LM head;
    model: a causal LM directory (``path``) with the verifier's vocabulary;
    config: a fresh random model of the verifier's architecture family and vocabulary with
    ``hidden_size``, ``num_layers``, ``num_heads`` (and optionally ``intermediate_size``); the
    verifier's embeddings are copied in when the hidden sizes match.
    """

    source: str = "verifier_layers"
    layers: Any = "every:6"
    path: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    copy_embeddings: bool = True
    freeze_embeddings: bool = False  # keep the (verifier's) embeddings and LM head fixed: cheaper steps


@dataclass
class DrafterSection:
    # medusa: heads on the verifier | draft_model: a small standalone LM (DistillSpec) |
    # eagle3: one decoder layer over the verifier's fused features (EAGLE-3)
    kind: str = "medusa"
    num_heads: int = 4
    num_layers: int = 1  # medusa: residual blocks per head; eagle3: decoder layers (1, as EAGLE-3 and vLLM)
    shared_lm_head: bool = False
    draft_vocab_size: int | None = None
    # eagle3: the verifier hidden states fused, as transformers' hidden_states indices (id i = the
    # input to layer i, vLLM's convention); default (2, N // 2, N - 3) as vLLM's
    aux_layer_ids: list[int] | None = None
    # (init_*: their effect on tau per CPU minute is measured in docs/eagle3.md, "τ per CPU minute")
    # eagle3: start drafter layer i as the verifier's decoder layer init_layer + i (0..N-1): its
    # q/k/v/o, MLP and both norms (input_layernorm also as the feature half's hidden_norm), and the
    # drafter's final norm as the verifier's; unset: random layers. Llama-style layers only (no
    # biases or q/k norms); a verifier sharded over several processes (verifier.shard) is refused.
    init_layer: int | None = None
    # eagle3 with init_layer: where the verifier's H-wide q/k/v columns go in the first layer's
    # 2H-wide input cat(norm(embed), norm(feature)): feature | embed half (the other zero) | split (both, x 0.5)
    init_qkv_input: str = "feature"
    # eagle3: fc (n_aux*H -> H) starts random | last (the identity on the deepest aux id's block,
    # others zero: with init_layer = that id and init_qkv_input feature, the drafter starts as that
    # verifier layer exactly on real rows) | mean (identity / n_aux on every block)
    init_fc: str = "random"
    student: StudentSection | None = None  # draft_model only; defaults to StudentSection()


@dataclass
class SelfDistillSection:
    # "default" = the offline training prompt source; "sharegpt" / "sharegpt:PATH" = ShareGPT V3's
    # first user turns (in an order fixed by training.seed); or a prompt source as in `specheads bench`
    # (a hub dataset `name[:split]`, a saved dataset, a jsonl file); or a list of these, mixed in equal
    # shares in an order fixed by training.seed (e.g. [sharegpt, HuggingFaceH4/ultrachat_200k])
    prompts: str | list[str] = "default"
    num_prompts: int | None = 256
    # answer each conversation's first `turns` user turns one after the other (ShareGPT, and datasets
    # with `messages` such as UltraChat), each after the verifier's own earlier answers (on-policy
    # multi-turn data; MT-Bench's second turns are like these)
    turns: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.0
    batch_size: int = 8
    output_dir: str = "runs/data/self_distilled"
    # Who writes the answers (training.answer_engines): hf = generate in the training process (the only
    # engine that stores EAGLE-3 features while it generates; others leave them to the first epoch);
    # openai = OpenAI-compatible servers (`vllm serve`, SGLang) at `endpoints`; vllm = vllm.LLM in this process
    engine: str = "hf"
    endpoints: list[str] | None = None  # openai: base URLs, http://host:port/v1
    concurrency: int = 32  # openai: requests in flight over all endpoints (and all processes)
    request_timeout: float = 600.0  # openai: seconds per request
    max_retries: int = 5  # openai: tries after a failed request (backoff 1, 2, 4, ... s), then the run stops
    api_key_env: str | None = None  # openai: the environment variable holding the API key (never the key itself)
    served_model: str | None = None  # openai: the name the endpoints serve the verifier under, when not its own
    vllm_args: dict | None = None  # vllm: extra vllm.LLM arguments (tensor_parallel_size, gpu_memory_utilization, ...)

    def engine_options(self):
        """The engine settings as ``answer_engines.EngineOptions``."""
        from .answer_engines import EngineOptions

        return EngineOptions(endpoints=self.endpoints, concurrency=self.concurrency,
                             request_timeout=self.request_timeout, max_retries=self.max_retries,
                             api_key_env=self.api_key_env, served_model=self.served_model, vllm_args=dict(self.vllm_args or {}))


class _UnsetSelfDistill(SelfDistillSection):
    """data.self_distill when the recipe leaves it out: told apart from a section it writes, so that
    naming only data.conversations still means conversations only."""


@dataclass
class DataSection:
    # Self-distil when the recipe writes this section (`self_distill: {}` for the defaults), or
    # leaves it out and names no conversations; `null` never. With conversations too, the two
    # datasets are concatenated.
    self_distill: SelfDistillSection | None = field(default_factory=_UnsetSelfDistill)
    # An existing conversation dataset (teacher-forced on its replies); "sharegpt" / "sharegpt:PATH"
    # = ShareGPT V3's first user turns and the replies they got.
    conversations: str | None = None
    num_conversations: int | None = None  # use at most this many of data.conversations
    max_length: int = 512
    eval_fraction: float = 0.05




@dataclass
class ObjectiveSection:
    # eagle3: soft (cross-entropy against the verifier's distribution over the draft vocabulary).
    # medusa: ce (hard labels) | kl (soft labels, KL to the verifier's own distribution).
    # draft_model: fkl | rkl | jsd | tvd, divergences from the verifier's full next-token
    # distribution (specheads/training/losses.py). Unset: ce for medusa, fkl for draft_model.
    loss: str | None = None
    head_decay: float = 0.8  # medusa: head k's loss weight is head_decay ** k
    # medusa: false keeps the own LM heads at the verifier's rows and trains only the residual
    # blocks: ~H*H parameters per head instead of H*(H+V), which overfits far less on small data.
    train_lm_heads: bool = True
    # eagle3 only: training-time test unrolls ttt_steps draft steps; step i weighs ttt_decay ** i
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    # eagle3 only: a step's loss sum divided by the positions it scores (valid: answer positions
    # whose verifier argmax is in the draft vocabulary) or by every position of the padded batch
    # (all: batch x length, the original EAGLE-3 trainer's mean, which weighs later steps less;
    # measured in docs/eagle3.md, "τ per CPU minute")
    loss_normalization: str = "valid"
    # draft_model only:
    temperature: float = 1.0  # applied to both distributions before the divergence
    jsd_beta: float = 0.5  # jsd: weight of the verifier in the mixture; 0 = fkl, 1 = rkl
    ce_weight: float = 0.0  # + ce_weight * CE on the data's answer tokens
    on_policy_fraction: float = 0.0  # share of training examples whose answer the student writes itself
    on_policy_max_new_tokens: int = 128
    on_policy_temperature: float = 1.0  # 0 = greedy


@dataclass
class LoraSection:  # Medusa-2: the verifier tuned jointly with the heads
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lm_loss_weight: float = 1.0
    heads_warmup_steps: int = 100  # heads alone first, then the adapters join
    lr: float = 2e-4


@dataclass
class TrainingSection:
    # Steps (max_steps, warmup_steps, eval/save/log_every, lora.heads_warmup_steps) are optimizer
    # steps: each takes gradient_accumulation_steps micro-batches of batch_size examples (global,
    # over all processes), so an update sees batch_size * gradient_accumulation_steps examples.
    output_dir: str = "runs/medusa"
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    # AdamW's betas are (0.9, adam_beta2); the original EAGLE-3 trainer uses 0.95 (and max_grad_norm
    # 0.5): measured for EAGLE-3 in docs/eagle3.md, "τ per CPU minute"
    adam_beta2: float = 0.999
    warmup_steps: int = 20
    max_steps: int = 300
    max_grad_norm: float = 1.0  # 0 = no clipping
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    cache_hidden_states: bool = False
    # Where the cache lives (default <output_dir>/hidden_cache). Recipes over the same data and
    # verifier may share one folder: its key (the verifier's fingerprint and every training token)
    # is checked on open, so a folder made for anything else is refused, never misread.
    hidden_cache_dir: str | None = None
    lora: LoraSection | None = None
    # Batches of examples of similar length (sorted within groups of 256, runs of 64 shuffled):
    # padding is computed like real tokens, and conversations differ in length by 10x
    group_by_length: bool = True
    # What the drafter's forward and backward compute in (its weights and optimizer state stay
    # float32): auto = bfloat16 autocast where the hardware does bf16 natively (CUDA with bf16, a CPU
    # with AVX512-BF16 or AMX; measured 2x a float32 EAGLE-3 step on such a CPU), float32 elsewhere.
    dtype: str = "auto"

    def hidden_cache_path(self) -> str:
        return self.hidden_cache_dir or os.path.join(self.output_dir, "hidden_cache")


@dataclass
class Recipe:
    verifier: VerifierSection = field(default_factory=VerifierSection)
    drafter: DrafterSection = field(default_factory=DrafterSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    def validate(self) -> "Recipe":
        t, d, o, dr = self.training, self.data, self.objective, self.drafter
        if type(d.self_distill) is _UnsetSelfDistill:
            d.self_distill = None if d.conversations else SelfDistillSection()
        from .objectives import kind_module

        kind = kind_module(dr.kind)  # refuses an unknown kind
        distill = dr.kind == "draft_model"
        losses = kind.LOSSES
        if o.loss is None:
            o.loss = losses[0]
        if o.loss not in losses:
            raise SpecHeadsError(f"recipe value objective.loss={o.loss!r} is not a loss for drafter.kind={dr.kind} (choose {', '.join(losses)})")
        if distill and dr.student is None:
            dr.student = StudentSection()
        checks = [
            ("training.batch_size", t.batch_size, t.batch_size >= 1),
            ("training.gradient_accumulation_steps", t.gradient_accumulation_steps, t.gradient_accumulation_steps >= 1),
            ("training.lr", t.lr, t.lr > 0),
            ("training.weight_decay", t.weight_decay, t.weight_decay >= 0),
            ("training.adam_beta2", t.adam_beta2, 0 < t.adam_beta2 < 1),
            ("training.max_grad_norm", t.max_grad_norm, t.max_grad_norm is None or t.max_grad_norm >= 0),
            ("training.max_steps", t.max_steps, t.max_steps >= 1),
            ("training.warmup_steps", t.warmup_steps, 0 <= t.warmup_steps),
            ("training.eval_every", t.eval_every, t.eval_every >= 1),
            ("training.save_every", t.save_every, t.save_every >= 1),
            ("training.log_every", t.log_every, t.log_every >= 1),
            ("training.dtype", t.dtype, t.dtype in ("auto", "float32", "bfloat16")),
            ("data.max_length", d.max_length, d.max_length >= 8),
            ("data.eval_fraction", d.eval_fraction, 0 < d.eval_fraction < 1),
            ("data.num_conversations", d.num_conversations, d.num_conversations is None
             or (isinstance(d.num_conversations, int) and not isinstance(d.num_conversations, bool) and d.num_conversations >= 1)),
            ("objective.head_decay", o.head_decay, 0 < o.head_decay <= 1),
            ("objective.temperature", o.temperature, o.temperature > 0),
            ("objective.jsd_beta", o.jsd_beta, 0 <= o.jsd_beta <= 1),
            ("objective.ce_weight", o.ce_weight, o.ce_weight >= 0),
            ("objective.on_policy_fraction", o.on_policy_fraction, 0 <= o.on_policy_fraction <= 1),
            ("objective.on_policy_max_new_tokens", o.on_policy_max_new_tokens, o.on_policy_max_new_tokens >= 1),
            ("objective.on_policy_temperature", o.on_policy_temperature, o.on_policy_temperature >= 0),
            ("drafter.num_heads", dr.num_heads, 1 <= dr.num_heads <= 16),
            ("drafter.num_layers", dr.num_layers, dr.num_layers >= 0),
            ("verifier.dtype", self.verifier.dtype, self.verifier.dtype in ("auto", "float32", "bfloat16", "float16")),
        ]
        if d.self_distill is not None:
            s = d.self_distill
            checks += [
                ("data.self_distill.max_new_tokens", s.max_new_tokens, s.max_new_tokens >= 1),
                ("data.self_distill.temperature", s.temperature, s.temperature >= 0),
                ("data.self_distill.batch_size", s.batch_size, s.batch_size >= 1),
                ("data.self_distill.num_prompts", s.num_prompts, s.num_prompts is None or s.num_prompts >= 2),
                ("data.self_distill.turns", s.turns, isinstance(s.turns, int) and 1 <= s.turns <= 16),
            ]
            _check_self_distill_sources(s)
        if t.lora is not None:
            checks += [
                ("training.lora.r", t.lora.r, t.lora.r >= 1),
                ("training.lora.heads_warmup_steps", t.lora.heads_warmup_steps, t.lora.heads_warmup_steps >= 0),
                ("training.lora.lm_loss_weight", t.lora.lm_loss_weight, t.lora.lm_loss_weight >= 0),
                ("training.lora.lr", t.lora.lr, t.lora.lr > 0),
            ]
        if distill:
            checks += _student_checks(dr.student)
        for key, value, ok in checks:
            if not ok:
                raise SpecHeadsError(f"recipe value {key}={value!r} is out of range")
        self._check_kind_specific()
        from .sharded_verifier import check_recipe as check_shard

        check_shard(self)
        if hasattr(kind, "check_recipe"):
            kind.check_recipe(self)
        if d.self_distill is None and not d.conversations:
            raise SpecHeadsError("recipe needs data.self_distill or data.conversations")
        self._check_data_sources()
        return self

    def _check_data_sources(self) -> None:
        """A limit without conversations is refused; a ShareGPT file is found before any model loads."""
        from .sharegpt import is_sharegpt_source, sharegpt_path, source_path

        d = self.data
        if d.num_conversations is not None and not d.conversations:
            raise SpecHeadsError(f"recipe value data.num_conversations={d.num_conversations!r} needs data.conversations")
        prompts = d.self_distill.prompts if d.self_distill is not None else None
        for source in [d.conversations] + (prompts if isinstance(prompts, list) else [prompts]):
            if is_sharegpt_source(source):
                sharegpt_path(source_path(source))

    def _check_kind_specific(self) -> None:
        """Settings that belong to another drafter kind are refused, not silently ignored."""
        drafter, objective = DrafterSection(), ObjectiveSection()
        for key, kinds in OWNED_SETTINGS.items():
            if self.drafter.kind in kinds:
                continue
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            default = {"drafter": drafter, "objective": objective}.get(section)
            if value != (getattr(default, name) if default is not None else None):
                raise SpecHeadsError(f"recipe value {key}={value!r} is for drafter.kind={' or '.join(kinds)}, not {self.drafter.kind}")


# Settings that only some drafter kinds read; set (away from the default) for another kind, they are refused.
_DISTILL_ONLY = ("temperature", "jsd_beta", "ce_weight", "on_policy_fraction", "on_policy_max_new_tokens", "on_policy_temperature")
OWNED_SETTINGS: dict[str, tuple[str, ...]] = {
    "drafter.draft_vocab_size": ("medusa", "eagle3"),
    "drafter.shared_lm_head": ("medusa",),
    "drafter.aux_layer_ids": ("eagle3",),
    "drafter.init_layer": ("eagle3",),
    "drafter.init_qkv_input": ("eagle3",),
    "drafter.init_fc": ("eagle3",),
    "drafter.student": ("draft_model",),
    "objective.head_decay": ("medusa",),
    "objective.train_lm_heads": ("medusa",),
    "objective.ttt_steps": ("eagle3",),
    "objective.ttt_decay": ("eagle3",),
    "objective.loss_normalization": ("eagle3",),
    "training.lora": ("medusa",),
    **{f"objective.{k}": ("draft_model",) for k in _DISTILL_ONLY},
}


def _check_self_distill_sources(s: SelfDistillSection) -> None:
    """Prompt sources and the answer engine's settings (unknown engine, no or malformed endpoints,
    concurrency < 1, settings of another engine), refused naming key and value; endpoints normalised."""
    from .answer_engines import check_options

    prompts = s.prompts
    if isinstance(prompts, list):
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise SpecHeadsError(f"recipe value data.self_distill.prompts={prompts!r} must be a prompt source or a non-empty list of them")
        if len(set(prompts)) != len(prompts):
            raise SpecHeadsError(f"recipe value data.self_distill.prompts={prompts!r} names a source twice")
    elif not isinstance(prompts, str) or not prompts.strip():
        raise SpecHeadsError(f"recipe value data.self_distill.prompts={prompts!r} must be a prompt source or a non-empty list of them")
    urls = check_options(s.engine, s.engine_options())
    if urls or s.endpoints is not None:
        s.endpoints = urls


def _student_checks(st: "StudentSection") -> list[tuple[str, Any, bool]]:
    """What can be checked without the verifier; layer indices against its depth are checked
    by ``specheads.student.check_student`` as soon as the verifier is loaded."""
    from ..student import is_hub_id, layer_spec_ok

    if st.source not in STUDENT_SOURCES:
        raise SpecHeadsError(f"recipe value drafter.student.source={st.source!r} is not a student source (choose {', '.join(STUDENT_SOURCES)})")
    checks: list[tuple[str, Any, bool]] = []
    if st.source == "verifier_layers":
        if not layer_spec_ok(st.layers):
            raise SpecHeadsError(f"recipe value drafter.student.layers={st.layers!r} is not every:M, first:L (M, L >= 1) or a list of layer indices")
    elif st.source == "model":  # a hub id is checked when it loads (specheads.student.check_student)
        if not st.path or not (os.path.isfile(os.path.join(st.path, "config.json")) or is_hub_id(st.path)):
            raise SpecHeadsError(f"recipe value drafter.student.path={st.path!r} is not a model directory (no config.json) nor a hub id (org/name)")
    elif st.source == "config":
        for key in ("hidden_size", "num_layers", "num_heads"):
            value = getattr(st, key)
            checks.append((f"drafter.student.{key}", value, isinstance(value, int) and value >= 1))
        checks.append(("drafter.student.intermediate_size", st.intermediate_size, st.intermediate_size is None or st.intermediate_size >= 1))
        if all(ok for _, _, ok in checks) and st.hidden_size % st.num_heads:
            raise SpecHeadsError(f"recipe value drafter.student.hidden_size={st.hidden_size} is not a multiple of drafter.student.num_heads={st.num_heads}")
    return checks


def _build(cls, values: dict | None, where: str):
    if values is None:
        return None
    if not isinstance(values, dict):
        raise SpecHeadsError(f"recipe section '{where}' must be a mapping, got {values!r}")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise SpecHeadsError(f"unknown recipe key '{where}.{key}' (known: {', '.join(fields)})")
        sub = _SECTIONS.get((cls, key))
        if sub and value is not None:
            kwargs[key] = _build(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value, annotation, where: str):
    """YAML reads 1e-3 as a string and 3 as an int; give each key the type its field declares."""
    text = str(annotation)
    if value is None or isinstance(value, bool):
        return value
    try:
        if "float" in text and isinstance(value, (int, str)):
            return float(value)
        if text.startswith("int") and isinstance(value, str):
            return int(value)
    except ValueError:
        raise SpecHeadsError(f"recipe value {where}={value!r} is not a number") from None
    return value


_SECTIONS: dict[tuple[type, str], type] = {
    (Recipe, "verifier"): VerifierSection,
    (Recipe, "drafter"): DrafterSection,
    (Recipe, "data"): DataSection,
    (Recipe, "objective"): ObjectiveSection,
    (Recipe, "training"): TrainingSection,
    (DataSection, "self_distill"): SelfDistillSection,
    (DrafterSection, "student"): StudentSection,
    (TrainingSection, "lora"): LoraSection,
}


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = yaml.safe_load(raw)


def load_recipe(path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise SpecHeadsError(f"recipe file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise SpecHeadsError(f"recipe {path} is not valid YAML: {exc}") from exc
    for item in overrides or []:
        if "=" not in item:
            raise SpecHeadsError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), raw)
    recipe = _build(Recipe, tree, "recipe")
    return recipe.validate()


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
