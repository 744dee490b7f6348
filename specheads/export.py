"""Export a drafter to the folder a serving engine loads: vLLM 0.32 (``--format vllm``).

``export_vllm(drafter_dir, out_dir)`` reads the drafter folder, picks the exporter for its kind
from ``VLLM_EXPORTERS`` (``medusa``; ``eagle3``; ``draft_model`` for a plain model directory) and
writes, atomically, a folder that ``speculative_config={"method": ..., "model":
out_dir}`` loads. What vLLM cannot express is refused with a SpecHeadsError naming it: an export
is exact or it does not happen.

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
  {"enable_weights_track": false}``, which ``VllmExport.engine_args`` carries;
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


@dataclass(frozen=True)
class VllmExport:
    """Where an export went and how vLLM serves it."""

    path: Path
    method: str  # speculative_config["method"]
    max_speculative_tokens: int | None = None  # Medusa: its number of heads; None = no limit
    engine_args: dict = field(default_factory=dict)  # further LLM(...) arguments vLLM needs to load it

    def speculative_config(self, num_speculative_tokens: int | None = None) -> dict:
        k = num_speculative_tokens or self.max_speculative_tokens or 3  # a draft model has no limit: 3 as vLLM's examples
        if self.max_speculative_tokens is not None and k > self.max_speculative_tokens:
            raise SpecHeadsError(
                f"num_speculative_tokens={k} exceeds the {self.max_speculative_tokens} heads of the {self.method} "
                f"drafter in {self.path}: vLLM would build heads that have no weights"
            )
        return {"method": self.method, "model": str(self.path), "num_speculative_tokens": k}


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


# kind -> exporter(source dir, its config.json, output (temp) dir, verifier ref)
#   -> (method, max speculative tokens or None, engine args)
Exporter = Callable[[Path, dict, Path, _VerifierRef], "tuple[str, int | None, dict]"]
VLLM_EXPORTERS: dict[str, Exporter] = {}


def register_vllm_exporter(kind: str):
    def wrap(fn: Exporter) -> Exporter:
        VLLM_EXPORTERS[kind] = fn
        return fn

    return wrap


def drafter_kind(config: dict, source: Path) -> str:
    """A specheads checkpoint's recorded kind, or ``draft_model`` for a plain causal LM folder."""
    kind = (config.get("specheads") or {}).get("drafter_kind")
    if kind:
        return kind
    if "model_type" in config or "architectures" in config:
        return "draft_model"
    raise SpecHeadsError(f"{source / CONFIG} is neither a specheads drafter checkpoint (no 'specheads.drafter_kind') nor a model config (no 'model_type')")


def export_vllm(drafter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, verifier=None) -> VllmExport:
    """Write the vLLM folder for the drafter in ``drafter_dir`` to ``out_dir`` (replaced atomically).

    ``verifier``: a ``Verifier``, a name for ``load_verifier``, or None. It is loaded only when the
    export needs it (a shared Medusa LM head is written from it; a draft model without tokenizer
    files gets its tokenizer), by default the verifier the checkpoint records; a given one is also
    checked against the checkpoint's fingerprint (Medusa) or vocabulary size (draft model).
    """
    source, out = Path(drafter_dir), Path(out_dir)
    config = read_json_config(source)
    if out.resolve() == source.resolve():
        raise SpecHeadsError(f"export output {out} is the drafter checkpoint itself: choose another folder")
    kind = drafter_kind(config, source)
    if kind not in VLLM_EXPORTERS:
        raise SpecHeadsError(f"drafter {source} is of kind '{kind}', which has no vLLM export (exportable: {', '.join(VLLM_EXPORTERS)})")
    ref = _VerifierRef(verifier, ((config.get("specheads") or {}).get("verifier") or {}).get("name"))
    result: dict = {}

    def write(tmp: Path) -> None:
        result["method"], result["max"], result["engine_args"] = VLLM_EXPORTERS[kind](source, config, tmp, ref)

    atomic_directory(out, write)
    return VllmExport(out.resolve(), result["method"], result["max"], result["engine_args"])  # absolute: vLLM may run elsewhere


# -- Medusa -------------------------------------------------------------------------------------
def check_vllm_medusa_config(config: dict) -> None:
    """Refuse keys vLLM's renaming would turn into num_heads / num_hidden_layers behind our back."""
    clash = [k for k in config if "num" in k and ("heads" in k or "layers" in k) and k not in ("num_heads", "num_hidden_layers")]
    if clash:
        raise SpecHeadsError(f"config keys {clash} would be renamed by vLLM's Medusa config to num_heads / num_hidden_layers, overriding the real values")


@register_vllm_exporter("medusa")
def _export_medusa(source: Path, config: dict, out: Path, ref: _VerifierRef) -> tuple[str, int, dict]:
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
    return KIND, cfg.num_heads, ({"model_loader_extra_config": {"enable_weights_track": False}} if truncated else {})


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
@register_vllm_exporter("draft_model")
def _export_draft_model(source: Path, config: dict, out: Path, ref: _VerifierRef) -> tuple[str, None, dict]:
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
        raise SpecHeadsError(f"draft model {source} has vocabulary size {vocab} but verifier '{verifier.name}' has {verifier.vocab_size}: vLLM's draft_model method needs the verifier's vocabulary")
    model.save_pretrained(out, safe_serialization=True)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, out / name)
    if not copied and ref.given:
        tokenizer = ref.get("copying the tokenizer").tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return "draft_model", None, {}


# -- EAGLE-3 ------------------------------------------------------------------------------------
# What vLLM 0.32's EAGLE-3 code (models/llama_eagle3.py, models/interfaces.py, v1/spec_decode/
# llm_base_proposer.py, v1/worker/gpu_model_runner.py) implies for the folder:
# - aux id k is captured as the target's residual stream after k layers (``hidden + residual``,
#   ids 0..N); transformers' ``hidden_states[k]`` is the same tensor for k < N, but
#   ``hidden_states[N]`` has the final norm applied and vLLM's id N does not: an id N is refused;
# - the captured states are concatenated in layer order, whatever order the config lists, and a
#   repeated id is captured once: fc's input blocks are put in ascending id order, repeats refused;
# - ``num_hidden_layers`` layers are built; layer 0 reads [input_layernorm(embedding),
#   hidden_norm(feature)] (``midlayer.*`` is renamed to ``layers.0.*``), later ones are plain
#   Llama layers (``layers.{i}.*``) that also own a ``hidden_norm`` they never use;
# - ``draft_id_to_target_id`` (from ``d2t``) exists only when draft_vocab_size < the target's
#   vocabulary (a ``d2t`` of a full vocabulary fails the load), ``t2d`` is skipped;
# - the draft's token embedding is the target's when the folder has none (``embed_tokens``
#   never written); ``lm_head.weight`` [draft_vocab, H] is the drafter's own;
# - its ``load_weights`` returns nothing, so vLLM's strict "weights not initialised" check does
#   not run: a tensor missing from the folder would silently stay uninitialised. Every parameter
#   vLLM builds is therefore written.
EAGLE3_VLLM_FLAGS = {"norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False}


@register_vllm_exporter("eagle3")
def _export_eagle3(source: Path, config: dict, out: Path, ref: _VerifierRef) -> tuple[str, None, dict]:
    from .drafters.eagle3 import KIND, Eagle3Config, load_eagle3_model, vllm_config

    hp = config["specheads"].get("hyper_parameters") or {}
    unknown = sorted(set(hp) - {f.name for f in fields(Eagle3Config)} - {"training"})
    if unknown:
        raise SpecHeadsError(f"EAGLE-3 checkpoint {source} has options {unknown} this exporter does not know, so it cannot say how vLLM would express them")
    verifier = ref.get("checking the EAGLE-3 drafter against its verifier") if ref.given else None
    model = load_eagle3_model(source, verifier)  # checks the kind, the verifier and every tensor's shape
    cfg = model.config
    ids = list(cfg.aux_layer_ids)
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise SpecHeadsError(
            f"EAGLE-3 checkpoint {source} reads verifier layers {ids} with {repeated} repeated: vLLM 0.32 captures each "
            "aux layer once, so its fc would get fewer features than it was trained on")
    last = [i for i in ids if i == cfg.num_verifier_layers]
    if last:
        raise SpecHeadsError(
            f"EAGLE-3 checkpoint {source} reads aux layer id {last[0]} (= the verifier's {cfg.num_verifier_layers} layers): specheads "
            "takes that feature from transformers' last hidden state, which is after the final norm, while vLLM 0.32 captures "
            "the residual stream before it. Train with aux_layer_ids below the verifier's depth to export")
    H = cfg.hidden_size
    order = sorted(range(len(ids)), key=lambda j: ids[j])  # vLLM concatenates in layer order
    fc = model.fc.weight.detach()
    tensors = {"fc.weight": torch.cat([fc[:, j * H:(j + 1) * H] for j in order], 1)}
    for name, p in model.midlayer.state_dict().items():
        tensors[f"midlayer.{name}"] = p
    for i, layer in enumerate(model.layers, start=1):  # vLLM's layers.1.. are our model.layers.0..
        for name, p in layer.state_dict().items():
            tensors[f"layers.{i}.{name}"] = p
        tensors[f"layers.{i}.hidden_norm.weight"] = torch.ones(H, dtype=model.norm.weight.dtype)  # built by vLLM, never read
    tensors["norm.weight"] = model.norm.weight
    head = model.lm_head.weight.detach()
    if cfg.draft_vocab_size < cfg.vocab_size:
        tensors["lm_head.weight"] = head
        tensors["d2t"] = model.d2t
        tensors["t2d"] = model.t2d  # skipped by vLLM; kept as the public EAGLE-3 checkpoints carry it
    else:  # no mapping at full size: put each row at its verifier id (d2t is all zeros unless permuted)
        placed = torch.empty_like(head)
        placed[model.draft_to_target()] = head
        tensors["lm_head.weight"] = placed

    out_config = vllm_config(cfg)
    out_config.update(EAGLE3_VLLM_FLAGS)
    out_config["eagle_config"] = {**out_config.get("eagle_config", {}), "eagle_aux_hidden_state_layer_ids": [ids[j] for j in order],
                                  "use_aux_hidden_state": True}
    out_config["architectures"] = ["LlamaForCausalLMEagle3"]
    out_config["num_hidden_layers"] = cfg.num_layers
    out_config["draft_vocab_size"] = cfg.draft_vocab_size
    out_config["target_hidden_size"] = H
    out_config.pop("specheads", None)
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(out_config, indent=2))
    return KIND, None, {}
