"""Tiny twins: a recipe for a hub model run end to end on a random, scaled-down copy of it.

``specheads train --recipe R --tiny-twin`` proves a recipe without its verifier's weights (no hub
here, and no GPU for an 8B model): it builds a random verifier of the recipe's architecture class
(the same transformers model class, layer pattern, attention shape ratios, rope settings, experts,
tied or untied head) with a few layers, hidden size 64 and a byte-level BPE vocabulary of a few
hundred tokens whose chat template is the family's, saves it as an ordinary Hugging Face model
folder, and runs the recipe's normal training path on it (``verifier.name`` pointing at the
folder, so the real loader reads it): data -> a few steps -> save -> load -> lossless greedy
decoding, speculative against plain, token for token, in float32. A mismatch is an error.

The architecture comes from the model's config: a local folder's or the Hugging Face cache's
``config.json`` when there is one, else the copy of the real fields shipped in
``specheads/data/hub_configs.json`` for the hub ids the shipped recipes name. What cannot run on
one small process is swapped, and each swap is said on stderr: hub datasets -> a few of the
bundled offline prompts, a serving engine -> Hugging Face generate (the endpoints would serve the
full model), a sharded verifier -> one whole copy, a hub student -> a scaled-down random twin of
its class with the verifier twin's tokenizer, and the sizes (steps, batch, lengths, draft
vocabulary). Drafter kind, objective, aux-layer policy, dtypes and ttt steps stay the recipe's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .atomic_files import atomic_directory, write_json_atomic
from .errors import SpecHeadsError

HUB_CONFIGS = "hub_configs.json"
MARKER = "tiny_twin.json"  # marks an output folder as a twin run's, which a rerun may clear
DEFAULT_ROOT = os.path.join("runs", "tiny-twin")


@dataclass(frozen=True)
class TwinShape:
    """The scaled-down shape: small enough for seconds on a CPU core, large enough to keep the
    architecture's features (GQA groups, head_dim unlike hidden / heads, experts routed top-k)."""

    hidden_size: int = 64
    num_heads: int = 4
    num_layers: int = 8  # vLLM's default aux layers (2, N // 2, N - 3) stay three distinct layers
    num_experts: int = 4
    experts_per_token: int = 2
    vocab_size: int = 512
    sliding_window: int = 64  # below the twin's max_length, so windowed layers really slide
    initializer_range: float = 0.5  # logits far from uniform: greedy argmax ties are rare


VERIFIER_SHAPE = TwinShape()
STUDENT_SHAPE = TwinShape(hidden_size=32, num_layers=2)


@dataclass(frozen=True)
class TwinRun:
    """The sizes a twin run swaps in for the recipe's (each capped, never raised)."""

    max_steps: int = 3
    batch_size: int = 2
    max_length: int = 128
    num_prompts: int = 8
    max_new_tokens: int = 24
    decode_prompts: int = 3
    num_draft_tokens: int = 4


# -- the real config --------------------------------------------------------------------------
@dataclass
class RealConfig:
    name: str  # what the recipe names (hub id, alias or folder)
    config: dict  # the config.json fields
    chat_format: str  # llama3 | chatml
    where: str  # where the fields were read


@functools.lru_cache(maxsize=1)
def shipped_configs() -> dict:
    with open(resources.files("specheads") / "data" / HUB_CONFIGS, encoding="utf-8") as f:
        return json.load(f)["models"]


def _shipped_entry(name: str) -> tuple[str, dict] | None:
    for key, entry in shipped_configs().items():
        if name == key or name in entry.get("aliases", ()):
            return key, entry
    return None


def _cached_hub_config(repo_id: str) -> str | None:
    """The config.json of ``repo_id`` in the Hugging Face cache, never fetched."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001  (not a valid repo id, no cache): nothing cached
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _guess_chat_format(config: dict) -> str:
    """Llama-3's header tokens for its 128k vocabulary, ChatML (Qwen, SmolLM2, ...) otherwise."""
    text = config.get("text_config") or config
    return "llama3" if text.get("model_type") in ("llama", "mllama") and int(text.get("vocab_size") or 0) >= 128000 else "chatml"


def real_config(name: str) -> RealConfig:
    """The config a twin of ``name`` is scaled from: a local folder's, the converted alias's, the
    Hugging Face cache's, else the shipped copy of the hub model's."""
    from .verifier import ALIASES, cache_dir

    shipped = _shipped_entry(name)
    candidates = []
    if os.path.isdir(name):
        candidates.append(os.path.join(name, "config.json"))
    elif name in ALIASES:
        candidates.append(str(cache_dir() / "verifiers" / name / "config.json"))
    else:
        candidates.append(_cached_hub_config(name))
        if shipped is not None and shipped[0] != name:
            candidates.append(_cached_hub_config(shipped[0]))
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            fmt = shipped[1]["chat_format"] if shipped is not None else _guess_chat_format(config)
            return RealConfig(name, config, fmt, path)
    if os.path.isdir(name):
        raise SpecHeadsError(f"cannot build a tiny twin of '{name}': the folder has no config.json")
    if shipped is None:
        known = ", ".join(k for k in shipped_configs())
        raise SpecHeadsError(
            f"cannot build a tiny twin of '{name}': its config.json is neither a local folder's nor in the Hugging Face "
            f"cache, and specheads/data/{HUB_CONFIGS} ships only {known} (download its config.json once, or name a folder)"
        )
    key, entry = shipped
    return RealConfig(name, dict(entry["config"]), entry["chat_format"], f"specheads/data/{HUB_CONFIGS} ({key}; from {entry['source'].split(';')[0]})")


# -- the tokenizer ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatFormat:
    specials: tuple[str, ...]
    bos: str | None
    eos: str  # what ends an assistant turn (the tokenizer's eos_token)
    pad: str
    extra_eos: tuple[str, ...]  # further ids generation stops at (Llama-3's end of text)
    template: str


CHAT_FORMATS = {
    # Llama-3 Instruct: header tokens around the role, <|eot_id|> after each turn, bos first.
    "llama3": ChatFormat(
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", extra_eos=("<|end_of_text|>",),
        template=(
            "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
            "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    ),
    # ChatML (Qwen, SmolLM2): <|im_start|>role\n ... <|im_end|>\n, no bos.
    "chatml": ChatFormat(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra_eos=(),
        template=(
            "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    ),
}


def _corpus() -> list[str]:
    """Every string of the bundled prompt files, in a fixed order: the BPE's training text."""
    texts: list[str] = []
    folder = resources.files("specheads") / "data"
    for name in sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl")):
        with open(folder / name, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def twin_tokenizer(chat_format: str, vocab_size: int = VERIFIER_SHAPE.vocab_size):
    """A byte-level BPE of ``vocab_size`` tokens trained on the bundled prompts (deterministic),
    with the family's special tokens and chat template; eos and pad set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fmt = CHAT_FORMATS[chat_format]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fmt.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if fmt.bos is not None:  # plain-text encoding starts with bos, as the family's tokenizer does
        bos_id = tok.token_to_id(fmt.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{fmt.bos} $A", pair=f"{fmt.bos} $A $B", special_tokens=[(fmt.bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fmt.bos, eos_token=fmt.eos, pad_token=fmt.pad,
                                   chat_template=fmt.template, model_max_length=1 << 20)


def _eos_ids(tokenizer, chat_format: str) -> list[int]:
    fmt = CHAT_FORMATS[chat_format]
    return [tokenizer.convert_tokens_to_ids(t) for t in (fmt.eos, *fmt.extra_eos)]


# -- the scaled-down config -------------------------------------------------------------------
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_WIDTH_KEYS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
_DROPPED = ("torch_dtype", "dtype", "quantization_config", "auto_map", "_name_or_path", "transformers_version", "architectures")


def scaled_config(real: dict, *, shape: TwinShape, vocab_size: int, bos: int | None, eos: list[int], pad: int) -> dict:
    """``real``'s fields with a twin's shape: the same model_type and options, hidden size, layers,
    heads (the grouped-query ratio and head_dim / (hidden / heads) kept), MLP and expert widths
    scaled with the hidden size, a few experts routed top-k, the layer pattern's first layers."""
    if "text_config" in real:
        raise SpecHeadsError(f"cannot build a tiny twin of a multimodal {real.get('model_type')!r} model (a text_config inside): "
                             "name a text-only causal LM")
    c = {k: v for k, v in real.items() if k not in _DROPPED}
    missing = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in c]
    if missing:
        raise SpecHeadsError(f"cannot build a tiny twin of a {c.get('model_type')!r} config without {', '.join(missing)}")
    H0, heads0, layers0 = int(c["hidden_size"]), int(c["num_attention_heads"]), int(c["num_hidden_layers"])
    kv0 = int(c.get("num_key_value_heads") or heads0)
    hd0 = int(c.get("head_dim") or H0 // heads0)
    H, heads, layers = shape.hidden_size, shape.num_heads, min(shape.num_layers, layers0)
    kv = max(1, heads // max(1, heads0 // kv0))
    while heads % kv:
        kv -= 1
    c.update(hidden_size=H, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers,
             vocab_size=vocab_size, eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=pad, bos_token_id=bos,
             initializer_range=shape.initializer_range)
    if "head_dim" in c:  # e.g. Qwen3-30B-A3B: 32 heads of 128 over a hidden size of 2048; even, as rotary needs
        c["head_dim"] = 2 * max(4, round(H / heads * hd0 / (H0 / heads0) / 2))
    for key in _WIDTH_KEYS:
        if isinstance(c.get(key), int) and c[key] > 0:
            c[key] = max(8, round(c[key] * H / H0))
    experts = next((k for k in _EXPERT_KEYS if isinstance(c.get(k), int) and c[k] > 0), None)
    if experts is not None:
        c[experts] = min(c[experts], shape.num_experts)
        for key in ("num_experts_per_tok", "experts_per_token", "moe_topk"):
            if isinstance(c.get(key), int):
                c[key] = min(c[key], shape.experts_per_token, c[experts])
        for key in ("n_group", "topk_group"):  # DeepSeek's grouped routing: one group of the few experts
            if isinstance(c.get(key), int):
                c[key] = 1
    if isinstance(c.get("layer_types"), list):  # the pattern's first layers (sliding / full, ...)
        c["layer_types"] = c["layer_types"][:layers]
    if isinstance(c.get("mlp_only_layers"), list):
        c["mlp_only_layers"] = [i for i in c["mlp_only_layers"] if i < layers]
    for key in ("max_window_layers", "first_k_dense_replace"):
        if isinstance(c.get(key), int):
            c[key] = min(c[key], layers) if c[key] < layers0 else layers
    if isinstance(c.get("sliding_window"), int) and c["sliding_window"] > 0:
        c["sliding_window"] = min(c["sliding_window"], shape.sliding_window)
    return c


def _model_config(fields: dict):
    from transformers import AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as exc:
        import transformers

        raise SpecHeadsError(f"cannot build a tiny twin of model_type {model_type!r}: transformers {transformers.__version__} "
                             f"does not know it ({str(exc).splitlines()[0]}), and specheads never runs remote code for a twin") from exc


def build_twin(real: RealConfig, folder: str | os.PathLike, *, shape: TwinShape = VERIFIER_SHAPE, tokenizer=None, seed: int = 0) -> str:
    """Write a random twin of ``real`` to ``folder`` (safetensors, config, generation config,
    tokenizer); ``tokenizer``: share another twin's (a student shares its verifier's)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if tokenizer is None:
        tokenizer = twin_tokenizer(real.chat_format, shape.vocab_size)
    fmt = real.chat_format
    eos = _eos_ids(tokenizer, fmt)
    fields = scaled_config(real.config, shape=shape, vocab_size=len(tokenizer), bos=tokenizer.bos_token_id, eos=eos,
                           pad=tokenizer.pad_token_id)
    config = _model_config(fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except ValueError as exc:
            raise SpecHeadsError(f"cannot build a tiny twin of {real.name!r}: {type(config).__name__} is not a causal LM "
                                 f"transformers can build ({str(exc).splitlines()[0]})") from exc
    model.config.architectures = [type(model).__name__]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / MARKER, {"twin_of": real.name, "config_from": real.where, "chat_format": fmt,
                                         "parameters": sum(p.numel() for p in model.parameters())})

    atomic_directory(folder, write)
    return str(folder)


# -- the recipe, swapped for one small process -----------------------------------------------
def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _note(what: str) -> None:
    print(f"[specheads] tiny twin: {what}", file=sys.stderr, flush=True)


def _is_local_source(source) -> bool:
    """Prompt / conversation sources that need no hub: the bundled sets, ShareGPT's installed file, local files."""
    from .prompts import SHIPPED
    from .training.sharegpt import is_sharegpt_source

    if not isinstance(source, str):
        return False
    return source in ("default", "random", *SHIPPED) or is_sharegpt_source(source) or os.path.exists(source)


def twin_overrides(recipe, out: str, verifier_dir: str, student_dir: str | None, run: TwinRun = TwinRun()) -> list[str]:
    """``--set`` values that turn ``recipe`` into its twin run, each swap said on stderr."""
    from .training.recipe import VerifierSection

    r, d, t, dr = recipe, recipe.data, recipe.training, recipe.drafter
    sets = [f"verifier.name={verifier_dir}"]
    _note(f"verifier {r.verifier.name} -> {verifier_dir} (a random twin of its architecture: the hub is out of reach here)")
    if "shard" in _fields(VerifierSection) and getattr(r.verifier, "shard", "none") not in (None, "none"):
        sets.append("verifier.shard=none")
        _note(f"verifier.shard {r.verifier.shard} -> none (one process holds the whole twin)")
    s = d.self_distill
    if s is not None:
        if not _is_local_source(s.prompts):
            sets.append("data.self_distill.prompts=default")
            _note(f"data.self_distill.prompts {s.prompts} -> default (the bundled offline prompts)")
        if s.engine != "hf":
            sets.append("data.self_distill.engine=hf")
            # the other engines' own settings, which engine hf refuses
            sets += [f"data.self_distill.{k}=null" for k in ("endpoints", "api_key_env", "served_model", "vllm_args") if getattr(s, k)]
            _note(f"data.self_distill.engine {s.engine} -> hf (the endpoints would serve the full model, not the twin)")
        sets += [
            f"data.self_distill.num_prompts={min(s.num_prompts or run.num_prompts, run.num_prompts)}",
            f"data.self_distill.max_new_tokens={min(s.max_new_tokens, run.max_new_tokens)}",
            f"data.self_distill.batch_size={min(s.batch_size, 4)}",
            f"data.self_distill.output_dir={os.path.join(out, 'data')}",
        ]
    if d.conversations:
        if _is_local_source(d.conversations):
            sets.append(f"data.num_conversations={min(d.num_conversations or run.num_prompts, run.num_prompts)}")
        else:
            sets += ["data.conversations=null", "data.num_conversations=null"]
            if s is None:
                sets += ["data.self_distill={}", "data.self_distill.prompts=default", f"data.self_distill.num_prompts={run.num_prompts}",
                         f"data.self_distill.max_new_tokens={run.max_new_tokens}", "data.self_distill.batch_size=4",
                         f"data.self_distill.output_dir={os.path.join(out, 'data')}"]
            _note(f"data.conversations {d.conversations} -> self-distilled answers to the bundled offline prompts")
    sets.append(f"data.max_length={min(d.max_length, run.max_length)}")
    if dr.draft_vocab_size is not None and dr.draft_vocab_size > VERIFIER_SHAPE.vocab_size:
        sets.append(f"drafter.draft_vocab_size={VERIFIER_SHAPE.vocab_size}")
    if dr.kind == "eagle3" and getattr(dr, "init_layer", None) is not None:
        from .drafters.eagle3 import default_aux_layers

        # recipes start the layer at the deepest aux layer (the one `init_fc: last` passes through)
        layer = min(default_aux_layers(VERIFIER_SHAPE.num_layers)[-1], VERIFIER_SHAPE.num_layers - dr.num_layers)
        sets.append(f"drafter.init_layer={layer}")
        _note(f"drafter.init_layer {dr.init_layer} -> {layer} (the twin's deepest default aux layer; it has at most "
              f"{VERIFIER_SHAPE.num_layers} layers)")
    if dr.kind == "draft_model" and dr.student is not None:
        st = dr.student
        if st.source == "model":
            sets.append(f"drafter.student.path={student_dir}")
            _note(f"drafter.student.path {st.path} -> {student_dir} (a random twin of its architecture, with the verifier twin's tokenizer)")
        elif st.source == "config":
            sets += [f"drafter.student.hidden_size={STUDENT_SHAPE.hidden_size}", f"drafter.student.num_heads={STUDENT_SHAPE.num_heads}",
                     f"drafter.student.num_layers={min(st.num_layers, STUDENT_SHAPE.num_layers)}", "drafter.student.intermediate_size=null"]
    o = recipe.objective
    if dr.kind == "draft_model" and o.on_policy_fraction > 0:
        sets.append(f"objective.on_policy_max_new_tokens={min(o.on_policy_max_new_tokens, run.max_new_tokens)}")
    steps = min(t.max_steps, run.max_steps)
    sets += [
        f"training.output_dir={os.path.join(out, 'train')}",
        f"training.max_steps={steps}", f"training.batch_size={min(t.batch_size, run.batch_size)}",
        "training.gradient_accumulation_steps=1", f"training.warmup_steps={min(t.warmup_steps, 1)}",
        f"training.eval_every={steps}", f"training.save_every={steps}", "training.log_every=1",
    ]
    if t.hidden_cache_dir is not None:
        sets.append(f"training.hidden_cache_dir={os.path.join(out, 'features')}")
    if t.lora is not None:
        sets.append(f"training.lora.heads_warmup_steps={min(t.lora.heads_warmup_steps, 1)}")
    _note(f"sizes: {steps} steps, batch {min(t.batch_size, run.batch_size)}, max_length {min(d.max_length, run.max_length)}, "
          f"{run.num_prompts} prompts of {run.max_new_tokens} new tokens")
    return sets


def _prepare_output(out: str) -> None:
    """A rerun starts clean; a folder that is not a twin run's is never cleared."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise SpecHeadsError(f"--output-dir {out} exists and is not a tiny-twin run's folder (no {MARKER}): name a new or empty folder")
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    os.makedirs(out, exist_ok=True)


# -- lossless decoding --------------------------------------------------------------------------
def check_lossless(verifier_dir: str, drafter_dir: str, run: TwinRun = TwinRun(), *, device: str | None = "auto") -> list[dict]:
    """Greedy decoding with the trained drafter against plain greedy decoding, in float32, on a few
    bundled prompts: the tokens must be identical (printed per prompt). Raises on a mismatch."""
    from .decoding import SpeculativeDecoder
    from .drafters import build_drafter
    from .prompts import load_prompts
    from .verifier import load_verifier

    verifier = load_verifier(verifier_dir, dtype="float32", device=device)
    drafter = build_drafter(drafter_dir, verifier)
    plain = SpeculativeDecoder(verifier, None)
    spec = SpeculativeDecoder(verifier, drafter, num_draft_tokens=run.num_draft_tokens, control="fixed")
    results, bad = [], []
    for i, prompt in enumerate(load_prompts("default", limit=run.decode_prompts)):
        ids = verifier.encode(prompt)
        want = plain.generate(ids, max_new_tokens=run.max_new_tokens).token_ids
        out = spec.generate(ids, max_new_tokens=run.max_new_tokens)
        same = out.token_ids == want
        accepted = sum(out.stats.accepted_at)
        print(f"[specheads] tiny twin: prompt {i}: {len(want)} tokens, speculative == plain greedy: {same} "
              f"({accepted} drafted tokens accepted in {out.stats.verify_steps} steps)", flush=True)
        results.append({"prompt": i, "tokens": len(want), "identical": same, "accepted": accepted})
        if not same:
            bad.append(f"prompt {i}: plain {want} vs speculative {out.token_ids}")
    if bad:
        raise SpecHeadsError(f"tiny twin: speculative decoding with {drafter_dir} is not lossless: " + "; ".join(bad))
    return results


# -- the whole run -------------------------------------------------------------------------------
def run_tiny_twin(recipe_path: str, overrides: list[str] | None = None, output_dir: str | None = None, *, progress: bool = True) -> dict:
    """Run ``recipe_path`` on a tiny twin of its verifier: build the twin (and a student's), train
    with the swapped sizes, load the drafter and check lossless greedy decoding. Returns a summary
    (also written to ``<output>/tiny_twin.json``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would build and clear the same folders
        raise SpecHeadsError("--tiny-twin runs on one process: run `specheads train --recipe R --tiny-twin` (or python "
                             "train/train.py ...) directly, not under a multi-process accelerate launch")
    threads = torch.get_num_threads()
    # A twin's matrices are 64 wide: threads cost more than they give (on a busy 2-core machine the
    # Qwen3-MoE twin's self-distillation took 82 s with torch's default threads, 2.5 s with one);
    # one intra-op thread, restored afterwards.
    torch.set_num_threads(1)
    try:
        return _run(recipe_path, list(overrides or []), output_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _run(recipe_path: str, overrides: list[str], output_dir: str | None, progress: bool) -> dict:
    from .training.loop import train
    from .training.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)  # the recipe as written must be valid first
    name = Path(recipe_path).stem
    out = output_dir or os.path.join(DEFAULT_ROOT, name)
    _prepare_output(out)
    write_json_atomic(os.path.join(out, MARKER), {"recipe": recipe_path, "status": "running"})
    real = real_config(recipe.verifier.name)
    _note(f"{recipe.verifier.name}: {real.config.get('model_type')} config from {real.where}")
    verifier_dir = build_twin(real, os.path.join(out, "verifier"))
    student_dir = None
    st = recipe.drafter.student
    if recipe.drafter.kind == "draft_model" and st is not None and st.source == "model":
        from transformers import AutoTokenizer

        student_real = real_config(st.path)
        _note(f"student {st.path}: {student_real.config.get('model_type')} config from {student_real.where}")
        student_dir = build_twin(student_real, os.path.join(out, "student"), shape=STUDENT_SHAPE,
                                 tokenizer=AutoTokenizer.from_pretrained(verifier_dir), seed=1)
    twin = load_recipe(recipe_path, overrides + twin_overrides(recipe, out, verifier_dir, student_dir))
    drafter_dir = train(twin, progress=progress)
    # Medusa-2 decodes with the verifier its LoRA adapters tuned (merged and saved beside the drafter)
    tuned = os.path.join(twin.training.output_dir, "verifier")
    results = check_lossless(tuned if os.path.isfile(os.path.join(tuned, "config.json")) else verifier_dir, drafter_dir)
    summary = {"recipe": recipe_path, "status": "lossless", "verifier": recipe.verifier.name, "twin": verifier_dir,
               "drafter": drafter_dir, "drafter_kind": twin.drafter.kind, "decoding": results}
    write_json_atomic(os.path.join(out, MARKER), summary)
    print(f"[specheads] tiny twin of {recipe_path}: data -> {twin.training.max_steps} steps -> save -> load -> lossless greedy "
          f"decoding on {len(results)} prompts ({drafter_dir})", flush=True)
    return summary
