"""Export a drafter to the folder a serving engine loads, in one of three formats.

``export_drafter(drafter_dir, out_dir, format=...)`` reads the drafter folder, picks the exporter
registered for its kind and the format (``EXPORTERS[format][kind]``; kinds: ``medusa``,
``eagle3``, ``draft_model`` for a plain model directory) and writes the folder atomically:

- ``vllm`` (the default; ``export_vllm``): what vLLM 0.32 loads with
  ``speculative_config={"method": ..., "model": out_dir}``: Medusa heads, an EAGLE-3 drafter (the
  original EAGLE-3 layout: ``LlamaForCausalLMEagle3``, ``midlayer.*``, ``d2t``), a draft model.
- ``sglang``: what SGLang's ``--speculative-draft-model-path`` loads: EAGLE-3 in the original
  layout with every field SGLang reads written out, so that vLLM reads the same folder alike
  (``--speculative-algorithm EAGLE3``), and a draft model (``STANDALONE``).
- ``speculators``: vLLM's "speculators" layout of an EAGLE-3 drafter, which names its verifier, so
  that ``vllm serve OUT`` (``LLM(model=OUT)``) serves it without a speculative config.

What an engine cannot express is refused with a SpecHeadsError naming it, a kind the format's
engine cannot serve included: an export is exact or it does not happen. Every config field a
loader reads is written, so that no loader default decides how the weights are used.

What vLLM 0.32's Medusa code (``transformers_utils/configs/medusa.py``, ``models/medusa.py``)
implies for the folder:
- it renames every config key containing "num" and "heads" to ``num_heads`` and "num" and
  "layers" to ``num_hidden_layers``, so the config holds no other such key;
- the block bias is read only when ``medusa_fc_bias`` is true, and a shared LM head is the
  tensor ``lm_heads.0.weight`` of a config with ``original_lm_head`` (vLLM does not reuse the
  target's head: the export writes the verifier's);
- own LM heads are built over the full vocabulary, and ``truncated_vocab_size`` + ``token_map``
  load only with the shared head: own heads over a truncated draft vocabulary cannot be served;
- its loader registers ``token_map`` as a parameter without reporting it loaded, so its strict
  check fails every truncated folder ("weights were not initialized from checkpoint:
  {'token_map'}"): such a folder is served with ``model_loader_extra_config=
  {"enable_weights_track": false}``, which ``Export.engine_args`` carries;
- ``num_speculative_tokens`` replaces ``num_heads``: serve with at most ``num_heads`` tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .atomic_files import atomic_directory
from .checkpoint import CONFIG, WEIGHTS, check_verifier, read_json_config
from .errors import SpecHeadsError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
FORMATS = ("vllm", "sglang", "speculators")
DEFAULT_SPECULATIVE_TOKENS = 3  # vLLM's examples and the speculators converter

# Why a format's engine cannot serve a kind: the refusal says it.
NOT_SERVED = {
    ("sglang", "medusa"): "SGLang has no Medusa algorithm (its --speculative-algorithm takes EAGLE, EAGLE3, NEXTN, "
                          "STANDALONE, NGRAM and DFlash variants); export Medusa heads with --format vllm",
    ("speculators", "medusa"): "vLLM 0.32's speculators format knows eagle3, peagle, dflash, dflash2 and dspark drafters only "
                               "(vllm/transformers_utils/configs/speculators/algos.py); export Medusa heads with --format vllm",
    ("speculators", "draft_model"): "vLLM 0.32's speculators format knows eagle3, peagle, dflash, dflash2 and dspark drafters only "
                                    "(vllm/transformers_utils/configs/speculators/algos.py); a draft model is served with "
                                    "--format vllm (method draft_model) or --format sglang (STANDALONE)",
}


@dataclass(frozen=True)
class Export:
    """Where an export went and how an engine serves it."""

    path: Path
    method: str  # vLLM's speculative_config["method"]; every format's folder also loads in vLLM this way
    max_speculative_tokens: int | None = None  # Medusa: its number of heads; None = no limit
    engine_args: dict = field(default_factory=dict)  # further LLM(...) arguments vLLM needs to load it
    format: str = "vllm"
    verifier: str | None = None  # speculators: the verifier the folder names (speculators_config.verifier.name_or_path)

    def speculative_config(self, num_speculative_tokens: int | None = None) -> dict:
        k = num_speculative_tokens or self.max_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS  # a draft model has no limit
        if self.max_speculative_tokens is not None and k > self.max_speculative_tokens:
            raise SpecHeadsError(
                f"num_speculative_tokens={k} exceeds the {self.max_speculative_tokens} heads of the {self.method} "
                f"drafter in {self.path}: vLLM would build heads that have no weights"
            )
        return {"method": self.method, "model": str(self.path), "num_speculative_tokens": k}


VllmExport = Export  # its name while vLLM was the only format


@dataclass(frozen=True)
class ExportOptions:
    """What a format writes besides the drafter itself."""

    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS  # speculators: proposal_methods[0].speculative_tokens
    verifier_path: str | None = None  # speculators: verifier.name_or_path (default: the checkpoint's verifier)


class _VerifierRef:
    """The verifier an export may need (a shared LM head, a tokenizer), loaded only if needed."""

    def __init__(self, verifier, recorded_name: str | None):
        self._given = verifier
        self._recorded = recorded_name

    @property
    def given(self) -> bool:
        return self._given is not None

    def get(self, why: str):
        if self._given is None or isinstance(self._given, str):
            name = self._given or self._recorded
            if not name:
                raise SpecHeadsError(f"{why}, but no verifier was given and the checkpoint records none: pass verifier=...")
            from .verifier import load_verifier

            self._given = load_verifier(name)
        return self._given

    def served_name(self, override: str | None) -> str:
        """The verifier an engine loads by name: ``override``, else the given or recorded one. A
        specheads alias becomes its converted local folder and a local folder an absolute path (an
        engine knows neither the alias nor the working directory); a hub id stays as it is."""
        from .verifier import ALIASES, converted_alias_dir

        name = override or (self._given if isinstance(self._given, str) else getattr(self._given, "name", None)) or self._recorded
        if not name:
            raise SpecHeadsError("the speculators format names its verifier, but none was given and the checkpoint records none: "
                                 "pass --verifier-path")
        if name in ALIASES:
            return str(converted_alias_dir(name))
        local = Path(name).expanduser()
        return str(local.resolve()) if local.is_dir() else name

    def architectures(self, served: str) -> list[str]:
        """The ``architectures`` of the verifier the engine loads: from its local config.json, else
        from the given loaded verifier; empty for a hub id that is not here (nothing is downloaded
        to look it up)."""
        config = Path(served) / CONFIG
        if config.is_file():
            try:
                return list(json.loads(config.read_text()).get("architectures") or [])
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
                raise SpecHeadsError(f"verifier config {config} is corrupt: {exc}") from exc
        if self._given is not None and not isinstance(self._given, str):
            return list(getattr(self._given.config, "architectures", None) or [])
        return []


# format -> kind -> exporter(source dir, its config.json, output (temp) dir, verifier ref, options)
#   -> keyword arguments of Export besides path and format (method at least)
Exporter = Callable[[Path, dict, Path, _VerifierRef, ExportOptions], dict]
EXPORTERS: dict[str, dict[str, Exporter]] = {name: {} for name in FORMATS}
VLLM_EXPORTERS = EXPORTERS["vllm"]


def register_exporter(format: str, kind: str):
    def wrap(fn: Exporter) -> Exporter:
        EXPORTERS[format][kind] = fn
        return fn

    return wrap


def register_vllm_exporter(kind: str):
    return register_exporter("vllm", kind)


def drafter_kind(config: dict, source: Path) -> str:
    """A specheads checkpoint's recorded kind, or ``draft_model`` for a plain causal LM folder."""
    kind = (config.get("specheads") or {}).get("drafter_kind")
    if kind:
        return kind
    if "model_type" in config or "architectures" in config:
        return "draft_model"
    raise SpecHeadsError(f"{source / CONFIG} is neither a specheads drafter checkpoint (no 'specheads.drafter_kind') nor a model config (no 'model_type')")


def export_drafter(drafter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, format: str = "vllm", verifier=None,
                   verifier_path: str | None = None, num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS) -> Export:
    """Write the ``format`` folder for the drafter in ``drafter_dir`` to ``out_dir`` (replaced atomically).

    ``verifier``: a ``Verifier``, a name for ``load_verifier``, or None. It is loaded only when the
    export needs it (a shared Medusa LM head is written from it; a draft model without tokenizer
    files gets its tokenizer), by default the verifier the checkpoint records; a given one is also
    checked against the checkpoint's fingerprint (Medusa, EAGLE-3) or vocabulary size (draft
    model). ``verifier_path`` and ``num_speculative_tokens`` are what a speculators folder names
    (the verifier vLLM loads, by default the given or recorded one; the tokens it drafts).
    """
    if format not in EXPORTERS:
        raise SpecHeadsError(f"export format '{format}' is not one of {', '.join(FORMATS)}")
    if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
        raise SpecHeadsError(f"num_speculative_tokens={num_speculative_tokens!r} must be a whole number >= 1")
    source, out = Path(drafter_dir), Path(out_dir)
    config = read_json_config(source)
    if out.resolve() == source.resolve():
        raise SpecHeadsError(f"export output {out} is the drafter checkpoint itself: choose another folder")
    kind = drafter_kind(config, source)
    exporters = EXPORTERS[format]
    if kind not in exporters:
        if (format, kind) in NOT_SERVED:
            raise SpecHeadsError(f"drafter {source} is of kind '{kind}', which --format {format} cannot serve: {NOT_SERVED[format, kind]}")
        engine = "vLLM" if format == "vllm" else format
        raise SpecHeadsError(f"drafter {source} is of kind '{kind}', which has no {engine} export (exportable: {', '.join(exporters)})")
    ref = _VerifierRef(verifier, ((config.get("specheads") or {}).get("verifier") or {}).get("name"))
    options = ExportOptions(num_speculative_tokens, verifier_path)
    result: dict = {}

    def write(tmp: Path) -> None:
        result.update(exporters[kind](source, config, tmp, ref, options))

    atomic_directory(out, write)
    return Export(out.resolve(), format=format, **result)  # absolute: the engine may run elsewhere


def export_vllm(drafter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, verifier=None) -> Export:
    """``export_drafter`` in the vllm format."""
    return export_drafter(drafter_dir, out_dir, format="vllm", verifier=verifier)


def _save(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2))


# -- Medusa -------------------------------------------------------------------------------------
def check_vllm_medusa_config(config: dict) -> None:
    """Refuse keys vLLM's renaming would turn into num_heads / num_hidden_layers behind our back."""
    clash = [k for k in config if "num" in k and ("heads" in k or "layers" in k) and k not in ("num_heads", "num_hidden_layers")]
    if clash:
        raise SpecHeadsError(f"config keys {clash} would be renamed by vLLM's Medusa config to num_heads / num_hidden_layers, overriding the real values")


@register_exporter("vllm", "medusa")
def _export_medusa(source: Path, config: dict, out: Path, ref: _VerifierRef, options: ExportOptions) -> dict:
    from .drafters.medusa import KIND, MedusaConfig, load_medusa_heads, vllm_medusa_keys

    hp = config["specheads"].get("hyper_parameters") or {}
    unknown = sorted(set(hp) - {f.name for f in fields(MedusaConfig)} - {"training"})
    if unknown:
        raise SpecHeadsError(f"Medusa checkpoint {source} has options {unknown} this exporter does not know, so it cannot say how vLLM would express them")
    try:
        heads = load_medusa_heads(source)  # checks the kind and every tensor's shape
    except TypeError as exc:  # a hyper-parameter missing from the config
        raise SpecHeadsError(f"Medusa checkpoint {source} has incomplete hyper-parameters: {exc}") from exc
    cfg = heads.config
    _check_recorded_vllm_keys(source, config, cfg)
    if ref.given or cfg.shared_lm_head:
        verifier = ref.get(f"Medusa heads {source} need their verifier (a shared LM head is written from it)")
        check_verifier(config["specheads"].get("verifier") or {}, verifier, source)

    tensors = {f"blocks.{h}.layers.{l}.{name}": p for h, block in enumerate(heads.blocks)
               for l, layer in enumerate(block["layers"]) for name, p in layer.named_parameters()}
    if cfg.shared_lm_head:
        # vLLM cuts this full head to the token_map's rows itself when truncated_vocab_size is set.
        tensors["lm_heads.0.weight"] = verifier.model.get_output_embeddings().weight
        if heads.token_map is not None:
            tensors["token_map"] = heads.token_map
    else:
        rows = [head.weight for head in heads.lm_heads]
        if heads.token_map is not None:
            rows = _full_vocab_rows(source, cfg, heads.token_map, rows)
        for h, w in enumerate(rows):
            tensors[f"lm_heads.{h}.weight"] = w

    vllm_config = {**vllm_medusa_keys(cfg), "medusa_fc_bias": cfg.bias, "original_lm_head": cfg.shared_lm_head}
    if cfg.shared_lm_head and heads.token_map is not None:
        vllm_config["truncated_vocab_size"] = int(heads.token_map.numel())
    check_vllm_medusa_config(vllm_config)
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(vllm_config, indent=2))
    truncated = "truncated_vocab_size" in vllm_config  # see the module docstring: vLLM's strict check misses token_map
    engine_args = {"model_loader_extra_config": {"enable_weights_track": False}} if truncated else {}
    return {"method": KIND, "max_speculative_tokens": cfg.num_heads, "engine_args": engine_args}


def _full_vocab_rows(source: Path, cfg, token_map: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Own heads over a draft vocabulary -> heads over the verifier's, when that is exact."""
    ids = token_map.long()
    if ids.unique().numel() != ids.numel() or int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise SpecHeadsError(f"Medusa checkpoint {source} has a corrupt token_map (repeated or out-of-range token ids)")
    if ids.numel() < cfg.vocab_size:
        raise SpecHeadsError(
            f"Medusa checkpoint {source} has own LM heads over a truncated draft vocabulary "
            f"(draft_vocab_size={ids.numel()} < vocab_size={cfg.vocab_size}): vLLM 0.32 builds own Medusa LM heads over the "
            "full vocabulary and loads truncated_vocab_size + token_map only with one shared head (original_lm_head), "
            "so these heads cannot be served exactly. Train with drafter.shared_lm_head=true (the verifier's rows of the draft "
            "vocabulary) or with draft_vocab_size unset (full vocabulary) to export."
        )
    # A draft vocabulary that is a permutation of the full one: put each row at its token's id.
    full = []
    for w in rows:
        placed = torch.empty_like(w)
        placed[ids] = w
        full.append(placed)
    return full


def _check_recorded_vllm_keys(source: Path, config: dict, cfg) -> None:
    """The checkpoint's own top-level vLLM keys (written by save_medusa) must agree with its
    hyper-parameters: a hand-edited folder is refused rather than guessed at."""
    check_vllm_medusa_config({k: v for k, v in config.items() if k != "specheads"})
    expected = {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers}
    wrong = {k: (config[k], v) for k, v in expected.items() if k in config and config[k] != v}
    if wrong:
        detail = ", ".join(f"{k}={a} vs {b}" for k, (a, b) in wrong.items())
        raise SpecHeadsError(f"Medusa checkpoint {source}: its config keys disagree with its specheads hyper-parameters ({detail})")


# -- draft model --------------------------------------------------------------------------------
@register_exporter("vllm", "draft_model")
@register_exporter("sglang", "draft_model")  # SGLang's STANDALONE algorithm loads the same folder
def _export_draft_model(source: Path, config: dict, out: Path, ref: _VerifierRef, options: ExportOptions) -> dict:
    """A causal LM folder -> a plain ``save_pretrained`` folder (safetensors, tokenizer, no specheads keys)."""
    from transformers import AutoModelForCausalLM

    if not any(source.glob("*.safetensors")):
        raise SpecHeadsError(f"draft model {source} has no .safetensors weights (pickled .bin weights are not loaded)")
    try:  # use_safetensors: never unpickle weights; the load also proves the folder is whole
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", use_safetensors=True)
    except Exception as exc:  # transformers raises OSError / ValueError / safetensors errors
        raise SpecHeadsError(f"draft model {source} does not load as a causal LM: {str(exc).splitlines()[0]}") from exc
    if hasattr(model.config, "specheads"):
        del model.config.specheads  # specheads-only metadata; vLLM's config parsing has no use for it
    vocab = model.get_output_embeddings().weight.shape[0]
    verifier = ref.get("checking the draft model's vocabulary") if ref.given else None
    recorded = (config.get("specheads") or {}).get("verifier")
    if verifier is not None and recorded:  # a distilled draft model records the verifier it learnt from
        check_verifier(recorded, verifier, source)
    if verifier is not None and vocab != verifier.vocab_size:
        raise SpecHeadsError(f"draft model {source} has vocabulary size {vocab} but verifier '{verifier.name}' has {verifier.vocab_size}: a draft model needs the verifier's vocabulary (vLLM's draft_model method, SGLang's STANDALONE)")
    model.save_pretrained(out, safe_serialization=True)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, out / name)
    if not copied and ref.given:
        tokenizer = ref.get("copying the tokenizer").tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return {"method": "draft_model"}


# -- EAGLE-3 ------------------------------------------------------------------------------------
# What vLLM 0.32's EAGLE-3 code (models/llama_eagle3.py, models/interfaces.py, v1/spec_decode/
# llm_base_proposer.py, v1/worker/gpu_model_runner.py) implies for the folder:
# - aux id k is captured as the target's residual stream after k layers (``hidden + residual``,
#   ids 0..N); transformers' ``hidden_states[k]`` is the same tensor for k < N, but
#   ``hidden_states[N]`` has the final norm applied and vLLM's id N does not: an id N is refused;
# - the captured states are concatenated in layer order, whatever order the config lists, and a
#   repeated id is captured once: fc's input blocks are put in ascending id order, repeats refused;
# - the ids are read from the top-level ``eagle_aux_hidden_state_layer_ids`` first, then from
#   ``eagle_config`` (its model runner v2 reads the top-level key only): both are written;
# - ``num_hidden_layers`` layers are built; layer 0 reads [input_layernorm(embedding),
#   hidden_norm(feature)] (``midlayer.*`` is renamed to ``layers.0.*``), later ones are plain
#   Llama layers (``layers.{i}.*``) that also own a ``hidden_norm`` they never use;
# - ``norm_before_residual`` (the residual is the un-normed feature in specheads' layer: false)
#   defaults to false for method eagle3 but to true in the speculators path: written everywhere;
# - ``draft_id_to_target_id`` (from ``d2t``) exists only when draft_vocab_size < the target's
#   vocabulary (a ``d2t`` of a full vocabulary fails the load), ``t2d`` is skipped;
# - the draft's token embedding is the target's when the folder has none (``embed_tokens``
#   never written); ``lm_head.weight`` [draft_vocab, H] is the drafter's own;
# - its ``load_weights`` returns nothing, so vLLM's strict "weights not initialised" check does
#   not run: a tensor missing from the folder would silently stay uninitialised. Every parameter
#   vLLM builds is therefore written.
EAGLE3_VLLM_FLAGS = {"norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False}

# What SGLang's loader reads (python/sglang/srt/models/llama_eagle3.py, LlamaForCausalLMEagle3, at
# sgl-project/sglang 03d5a7771f60 and d737979cbd17; models/llama.py; model_executor/model_runner.py):
# - ``num_hidden_layers`` must be 1 (main raises "EAGLE3 currently only supports 1 layer"; a
#   multi-layer variant, PR #18175, stacks layers that drop the residual stream, unlike specheads');
# - ``fc`` is Linear(3 * target_hidden_size, hidden_size, bias=config.bias): exactly 3 aux layers;
# - ``midlayer.*`` (q/k/v and gate/up are fused on load), ``fc``, ``norm``, ``lm_head`` are read; a
#   missing tensor is left at its random init without a word (SGLang PR #27908: no lm_head, no
#   accepted token), ``embed_tokens`` is always the target's, ``d2t`` becomes its hot token ids
#   (draft id + d2t), ``t2d`` is skipped;
# - ``draft_vocab_size`` None would borrow the target's head, ``tie_word_embeddings`` true would
#   make the embedding the head; rope from ``rope_theta`` / ``rope_scaling`` (or
#   ``rope_parameters``), ``max_position_embeddings`` (8192), ``head_dim``, ``rope_is_neox_style``
#   (true), ``partial_rotary_factor`` (1), ``attention_bias`` or ``bias``, ``hidden_act`` (silu
#   only), ``rms_norm_eps``: all written;
# - aux layers: ``eagle_config["eagle_aux_hidden_state_layer_ids"]`` (``use_aux_hidden_state``),
#   but SGLang counts them from the residual stream *entering* layer id + 1: every version before
#   PR #25454 (2026-05) adds 1 to each id, later ones only when the list's first id is 1.
SGLANG_AUX_LAYER_COUNT = 3


def sglang_aux_layer_ids(ids: list[int]) -> list[int]:
    """SGLang's ``eagle_config`` ids that capture the residual stream after each of ``ids``
    layers (specheads' and vLLM's ids) in every SGLang version: ``id - 1``, listed with 1 first,
    which old versions (always +1) and new ones (+1 when the first id is 1) read alike. Without 2
    among ``ids`` no list is read alike by both, and the export is refused."""
    if 2 not in ids:
        raise SpecHeadsError(
            f"the EAGLE-3 drafter reads verifier layers {ids}; SGLang reads aux layer ids as the output of layer id (it adds 1) "
            "before PR #25454 (2026-05) and since then only when the first id is 1, so only a drafter that reads layer 2 "
            "(the first of vLLM's and SGLang's default 2, N/2, N-3) is read alike by every SGLang version")
    return [1] + [k - 1 for k in sorted(ids) if k != 2]


@dataclass
class _Eagle3Parts:
    """An EAGLE-3 drafter as the engines lay it out, before naming."""

    cfg: object  # Eagle3Config
    aux_ids: list[int]  # ascending: the order vLLM and SGLang concatenate the captured layers in
    layers: list[dict[str, torch.Tensor]]  # per decoder layer; later layers carry the hidden_norm vLLM builds
    shared: dict[str, torch.Tensor]  # fc.weight (blocks in aux_ids order), norm.weight, lm_head.weight, d2t / t2d
    dtype: torch.dtype


def _eagle3_parts(source: Path, config: dict, ref: _VerifierRef) -> _Eagle3Parts:
    from .drafters.eagle3 import Eagle3Config, load_eagle3_model

    hp = config["specheads"].get("hyper_parameters") or {}
    unknown = sorted(set(hp) - {f.name for f in fields(Eagle3Config)} - {"training"})
    if unknown:
        raise SpecHeadsError(f"EAGLE-3 checkpoint {source} has options {unknown} this exporter does not know, so it cannot say how an engine would express them")
    verifier = ref.get("checking the EAGLE-3 drafter against its verifier") if ref.given else None
    model = load_eagle3_model(source, verifier)  # checks the kind, the verifier and every tensor's shape
    cfg = model.config
    ids = list(cfg.aux_layer_ids)
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise SpecHeadsError(
            f"EAGLE-3 checkpoint {source} reads verifier layers {ids} with {repeated} repeated: vLLM 0.32 and SGLang capture "
            "each aux layer once, so its fc would get fewer features than it was trained on")
    last = [i for i in ids if i == cfg.num_verifier_layers]
    if last:
        raise SpecHeadsError(
            f"EAGLE-3 checkpoint {source} reads aux layer id {last[0]} (= the verifier's {cfg.num_verifier_layers} layers): specheads "
            "takes that feature from transformers' last hidden state, which is after the final norm, while vLLM 0.32 and SGLang "
            "capture the residual stream before it. Train with aux_layer_ids below the verifier's depth to export")
    H = cfg.hidden_size
    order = sorted(range(len(ids)), key=lambda j: ids[j])  # the engines concatenate in layer order
    fc = model.fc.weight.detach()
    shared = {"fc.weight": torch.cat([fc[:, j * H:(j + 1) * H] for j in order], 1), "norm.weight": model.norm.weight}
    head = model.lm_head.weight.detach()
    if cfg.draft_vocab_size < cfg.vocab_size:
        shared.update({"lm_head.weight": head, "d2t": model.d2t,
                       "t2d": model.t2d})  # t2d: skipped by the engines; kept as the public EAGLE-3 checkpoints carry it
    else:  # no mapping at full size: put each row at its verifier id (d2t is all zeros unless permuted)
        placed = torch.empty_like(head)
        placed[model.draft_to_target()] = head
        shared["lm_head.weight"] = placed
    layers = [dict(model.midlayer.state_dict())]
    for layer in model.layers:
        layers.append({**layer.state_dict(), "hidden_norm.weight": torch.ones(H, dtype=model.norm.weight.dtype)})  # built by vLLM, never read
    return _Eagle3Parts(cfg, [ids[j] for j in order], layers, shared, model.norm.weight.dtype)


def _eagle3_tensors(parts: _Eagle3Parts, layer_prefix: Callable[[int], str]) -> dict[str, torch.Tensor]:
    tensors = dict(parts.shared)
    for i, layer in enumerate(parts.layers):
        tensors.update({f"{layer_prefix(i)}.{name}": t for name, t in layer.items()})
    return tensors


def _original_layer_prefix(i: int) -> str:
    return "midlayer" if i == 0 else f"layers.{i}"  # vLLM renames midlayer to layers.0


def _eagle3_llama_config(parts: _Eagle3Parts) -> dict:
    """The original EAGLE-3 config (Llama keys plus the EAGLE-3 ones), as vLLM's eagle3 method reads it."""
    from .drafters.eagle3 import vllm_config

    out = vllm_config(parts.cfg)  # architectures, model_type, sizes, rope, draft_vocab_size, target_hidden_size
    out.pop("specheads", None)
    out.update(EAGLE3_VLLM_FLAGS)
    out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": parts.aux_ids, "use_aux_hidden_state": True}
    out["eagle_aux_hidden_state_layer_ids"] = parts.aux_ids  # read by vLLM before eagle_config
    return out


@register_exporter("vllm", "eagle3")
def _export_eagle3(source: Path, config: dict, out: Path, ref: _VerifierRef, options: ExportOptions) -> dict:
    from .drafters.eagle3 import KIND

    parts = _eagle3_parts(source, config, ref)
    _save(out, _eagle3_tensors(parts, _original_layer_prefix), _eagle3_llama_config(parts))
    return {"method": KIND}


@register_exporter("sglang", "eagle3")
def _export_eagle3_sglang(source: Path, config: dict, out: Path, ref: _VerifierRef, options: ExportOptions) -> dict:
    """The original layout with every field SGLang reads; vLLM reads the same folder alike (its
    top-level aux ids come first for it, SGLang reads only ``eagle_config``'s)."""
    from .drafters.eagle3 import KIND

    parts = _eagle3_parts(source, config, ref)
    cfg = parts.cfg
    if cfg.num_layers != 1:
        raise SpecHeadsError(
            f"EAGLE-3 checkpoint {source} has {cfg.num_layers} decoder layers, and SGLang's LlamaForCausalLMEagle3 reads one "
            "(it refuses num_hidden_layers != 1): export it with --format vllm or --format speculators, or train num_layers=1")
    if len(parts.aux_ids) != SGLANG_AUX_LAYER_COUNT:
        raise SpecHeadsError(
            f"EAGLE-3 checkpoint {source} reads {len(parts.aux_ids)} verifier layers {parts.aux_ids}, and SGLang's fc reads "
            f"exactly {SGLANG_AUX_LAYER_COUNT} (Linear(3 * target_hidden_size, hidden_size)): export it with --format vllm")
    rope = dict(cfg.rope_parameters)
    if "mrope_section" in rope:
        raise SpecHeadsError(f"EAGLE-3 checkpoint {source} has multimodal rope (mrope_section), which SGLang's EAGLE-3 "
                             "drafter replaces with its own positions: export it with --format vllm")
    layer_ids = sglang_aux_layer_ids(parts.aux_ids)
    out_config = _eagle3_llama_config(parts)
    out_config.update({
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": layer_ids, "use_aux_hidden_state": True},
        "num_aux_hidden_states": len(parts.aux_ids),
        "bias": False,  # fc's bias, and or-ed into attention_bias
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_is_neox_style": True,  # rotate_half, as transformers' Llama (specheads' layer)
        "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0),
        "torch_dtype": str(parts.dtype).removeprefix("torch."),
    })
    _save(out, _eagle3_tensors(parts, _original_layer_prefix), out_config)
    return {"method": KIND}


@register_exporter("speculators", "eagle3")
def _export_eagle3_speculators(source: Path, config: dict, out: Path, ref: _VerifierRef, options: ExportOptions) -> dict:
    """vLLM's speculators layout (the speculators project's Eagle3SpeculatorConfig, as its
    eagle3_converter writes it): weights as ``layers.{i}.*``, the drafter's Llama config under
    ``transformer_layer_config``, the EAGLE-3 fields and the verifier at the top level. vLLM 0.32
    (transformers_utils/configs/speculators/) builds the draft config from
    ``transformer_layer_config`` plus draft_vocab_size, target_hidden_size, norm_before_residual
    (default true), norm_before_fc, fc_norm, norm_output and eagle_aux_hidden_state_layer_ids, and
    serves ``speculators_config.verifier.name_or_path`` with ``proposal_methods[0].speculative_tokens``."""
    from .drafters.eagle3 import KIND

    parts = _eagle3_parts(source, config, ref)
    cfg = parts.cfg
    llama = _eagle3_llama_config(parts)
    eagle_keys = ("architectures", "draft_vocab_size", "target_hidden_size", "eagle_config", "eagle_aux_hidden_state_layer_ids", *EAGLE3_VLLM_FLAGS)
    layer_config = {k: v for k, v in llama.items() if k not in eagle_keys}
    layer_config.update({
        "model_type": "llama",  # vLLM picks Eagle3LlamaForCausalLM by it
        # vLLM sizes fc from num_aux_hidden_states, else eagle_config's ids, else 3
        "num_aux_hidden_states": len(parts.aux_ids),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": parts.aux_ids, "use_aux_hidden_state": True},
    })
    served = ref.served_name(options.verifier_path)
    out_config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": options.num_speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": served, "architectures": ref.architectures(served)},
        },
        "transformer_layer_config": layer_config,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.hidden_size,
        **EAGLE3_VLLM_FLAGS,
        "eagle_aux_hidden_state_layer_ids": parts.aux_ids,
        "torch_dtype": str(parts.dtype).removeprefix("torch."),
    }
    _save(out, _eagle3_tensors(parts, lambda i: f"layers.{i}"), out_config)
    return {"method": KIND, "verifier": served}
