"""Training data for drafters: self-distillation from the verifier, and existing conversations.

Both sources give one record per conversation with

* ``input_ids``: the token ids of the whole conversation, as the verifier's chat template writes it;
* ``prompt_length``: how many leading ids are prompt. A drafter is trained on the positions after
  it (the assistant's answer); the prompt is context only.

**Self-distillation** (``generate_self_distillation``) lets the verifier answer prompts itself, so a
drafter learns the verifier's own distribution rather than another model's. An answer engine
(``training.answer_engines``) writes the answers: by default (``hf``) batches through
``model.generate`` with the KV cache, left padding and an attention mask; or an OpenAI-compatible
server (``openai``: ``vllm serve``, SGLang) or ``vllm.LLM`` (``vllm``), given the same chat-templated
token ids and returning answers in the same form. They are stored under ``output_dir``::

    output_dir/
      manifest.json          verifier name + fingerprint, generation settings, shard list, count
      shards/shard-00000/    a datasets.save_to_disk folder per shard (renamed into place when complete)
      shards/shard-00001/ ...

A run is resumable and appendable: prompts whose ``prompt_id`` (sha1 of the prompt) is already in
a shard are skipped, so an interrupted run redoes at most its unfinished shard, and a run with new
prompts adds shards. A directory made by another verifier or with other generation settings is
refused; one written by another engine is not (the manifest records which engine wrote each
shard). Only one run may write to an ``output_dir`` at a time; one run may span several
processes (``accelerator``, e.g. under ``accelerate launch``): the run's shards are named before
any is written and shard ``c`` goes to process ``c mod N``, so the folder holds the same records
whatever N is, and N processes generate about N times as fast.

Prompts are processed one shard (``shard_size`` prompts) at a time; within a shard they are sorted
by length so each batch pads little, and the shard's records are stored in input order. A batch
never spans two shards, so the effective batch size is at most ``shard_size``.

**Conversations** (``load_conversations``) come from a self-distilled directory, or from a jsonl
file, a ``save_to_disk`` folder, a parquet file or a hub dataset with ``messages``
(role/content) or ShareGPT ``conversations`` (from/value), or from ShareGPT V3 itself
(``sharegpt`` or ``sharegpt:PATH``: each conversation's first user turn and the reply it got,
read by ``specheads.training.sharegpt``). They are tokenised with the verifier's
chat template; ``prompt_length`` is the length of the chat-templated turns before the first
assistant turn, with the generation prompt. Multi-turn conversations are kept whole: only the part
before the first assistant turn is masked, so later user turns are trained on too (they are
context the drafter sees at inference anyway, and masking them would need a template-specific
parse of every turn boundary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import torch

from ..atomic_files import TMP_PREFIX, write_json_atomic
from ..errors import SpecHeadsError
from ..prompts import load_prompts

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT = "specheads.self_distillation"
FORMAT_VERSION = 1

ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bard": "assistant", "bing": "assistant", "ai": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}


def _features():
    from datasets import Features, Value

    try:  # datasets >= 4
        from datasets import List
    except ImportError:  # pragma: no cover - older datasets
        from datasets import Sequence as List
    return Features({
        "prompt_id": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "input_ids": List(Value("int64")),
        "prompt_length": Value("int64"),
    })


def _token_features():
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # pragma: no cover
        from datasets import Sequence as List
    return Features({"input_ids": List(Value("int64")), "prompt_length": Value("int64")})


# ----------------------------------------------------------------------------- prompts


def _normalise_turns(turns: Sequence[Any], where: str) -> list[dict]:
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise SpecHeadsError(f"{where}: a chat turn must be a dict with role and content, got {turn!r}")
        raw_role = turn.get("role", turn.get("from"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise SpecHeadsError(f"{where}: unknown chat role {raw_role!r} in turn {turn!r}")
        out.append({"role": role, "content": _content_text(turn.get("content", turn.get("value", "")))})
    return out


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _check_prompt(prompt: Any, index: int) -> Any:
    if isinstance(prompt, dict) and "user_turns" in prompt:  # a conversation answered turn by turn
        turns = prompt["user_turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise SpecHeadsError(f"prompt {index}: user_turns must be a non-empty list of non-blank strings, got {turns!r}")
        return {"user_turns": list(turns)}
    if isinstance(prompt, str):
        if not prompt.strip():
            raise SpecHeadsError(f"prompt {index} is blank: {prompt!r}")
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt:
        turns = _normalise_turns(prompt, f"prompt {index}")
        if turns[-1]["role"] == "assistant":
            raise SpecHeadsError(f"prompt {index} ends with an assistant turn, so there is nothing to answer: {prompt!r}")
        return turns
    raise SpecHeadsError(f"prompt {index} must be a string, a non-empty list of chat turns or {{'user_turns': [...]}}, got {prompt!r}")


def prompt_id(prompt: str | Sequence[dict]) -> str:
    """A stable id for a prompt: sha1 of its text (or of its turns as canonical JSON)."""
    if isinstance(prompt, str):
        payload = prompt
    elif isinstance(prompt, dict):
        payload = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
    else:
        payload = json.dumps([{"role": t["role"], "content": t["content"]} for t in prompt], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- manifest


def _tokenizer_info(verifier) -> dict:
    tok = verifier.tokenizer
    template = getattr(tok, "chat_template", None) if tok is not None else None
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "vocab_size": len(tok) if tok is not None else None,
        "chat_template_sha1": hashlib.sha1(template.encode("utf-8")).hexdigest() if template else None,
    }


def _verifier_info(verifier) -> dict:
    return {
        "name": str(verifier.name),
        "fingerprint": verifier.fingerprint(),
        "tokenizer": _tokenizer_info(verifier),
        "eos_token_ids": list(verifier.eos_token_ids),
    }


def _same_verifier(a: dict, b: dict) -> bool:
    keys = ("fingerprint", "tokenizer", "eos_token_ids")
    return all(a.get(k) == b.get(k) for k in keys)


def _read_manifest(output_dir: Path) -> dict | None:
    path = output_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecHeadsError(f"{path} is not valid JSON ({exc}): not a self-distillation directory?") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SpecHeadsError(f"{path} is not a specheads self-distillation manifest (format {manifest.get('format')!r})"
                             if isinstance(manifest, dict) else f"{path} is not a specheads self-distillation manifest")
    return manifest


def _shard_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / SHARDS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("shard-"))


def _clean_tmp(output_dir: Path) -> None:
    """Remove what an interrupted run left half-written (never a complete shard)."""
    for root in (output_dir, output_dir / SHARDS):
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_datasets():
    """No "Saving the dataset" / "Loading" bars from datasets under our own progress bar."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_shard(path: Path):
    from datasets import load_from_disk

    with _quiet_datasets():
        return load_from_disk(str(path))


def load_self_distilled(output_dir: str | os.PathLike):
    """All records of a self-distillation directory, as one ``datasets.Dataset`` (shard order)."""
    from datasets import Dataset, concatenate_datasets

    output_dir = Path(output_dir)
    if _read_manifest(output_dir) is None:
        raise SpecHeadsError(f"{output_dir} is not a self-distillation directory: it has no {MANIFEST}")
    shards = [_load_shard(p) for p in _shard_dirs(output_dir)]
    if not shards:
        return Dataset.from_dict({k: [] for k in _features()}, features=_features())
    return shards[0] if len(shards) == 1 else concatenate_datasets(shards)


def is_self_distilled(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


# ----------------------------------------------------------------------------- generation


def _check_settings(max_new_tokens, temperature, top_p, batch_size, shard_size, seed) -> None:
    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecHeadsError(f"{name} must be a positive integer, got {value!r}")

    positive_int("max_new_tokens", max_new_tokens)
    positive_int("batch_size", batch_size)
    positive_int("shard_size", shard_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecHeadsError(f"seed must be an integer, got {seed!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise SpecHeadsError(f"temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise SpecHeadsError(f"top_p must be in (0, 1], got {top_p!r}")


def _generation_config(verifier, max_new_tokens, temperature, top_p, pad_id):
    from transformers import GenerationConfig

    sample = temperature > 0
    # Every field that could change the distribution is set explicitly: generate() fills the
    # fields left None from the model's own generation_config (which may carry a
    # repetition penalty, top_k=50, ...). The result is the plain distribution that
    # specheads' decoding verifies against: temperature, then top-p.
    extra = (
        dict(temperature=float(temperature), top_p=float(top_p), top_k=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
        if sample else {}
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample, num_beams=1,
        repetition_penalty=1.0, no_repeat_ngram_size=0,
        eos_token_id=list(verifier.eos_token_ids) or None, pad_token_id=pad_id, use_cache=True,
        return_dict_in_generate=False, **extra,
    )


def _pad_id(verifier) -> int:
    tok_pad = getattr(verifier.tokenizer, "pad_token_id", None)
    if tok_pad is not None:
        return int(tok_pad)
    eos = verifier.eos_token_ids
    return int(eos[0]) if eos else 0


def _generate_batch(verifier, batch: list[list[int]], gen_config, pad_id: int, seed: int | None) -> list[list[int]]:
    """Answer ids for each prompt in ``batch`` (left-padded), cut after the first eos."""
    from ..decoding.kv_cache import no_router_outputs

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    device = verifier.device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        # A MoE config asking for router logits breaks batched generate (kv_cache.no_router_outputs).
        out = verifier.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_config,
            **no_router_outputs(verifier.model),
        )
    if hasattr(out, "sequences"):
        out = out.sequences
    eos = set(verifier.eos_token_ids)
    answers = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append(row if stop is None else row[: stop + 1])
    return answers


def _batch_seed(seed: int, ids: list[str]) -> int:
    """Sampling seed of one batch: depends on the seed and the batch's prompts, not on run history."""
    digest = hashlib.sha1((str(seed) + "".join(ids)).encode()).hexdigest()
    return int(digest[:15], 16)


class _Prompt(NamedTuple):
    """A prompt to answer: its id, its text or turns, and its encoded ids."""

    pid: str
    prompt: str | list[dict]
    ids: list[int]


@dataclass
class _Generation:
    """How every batch of a run is answered (the settings the manifest records, and what they make)."""

    verifier: Any
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int
    # (FeatureStore, aux layer ids, max_length): store each conversation's features as it is
    # generated (training.features), cut to the length training will read
    capture: tuple | None = None
    engine: Any = None  # the answer engine (answer_engines), built once there is something to answer
    train_length: int | None = None  # data.max_length: a prompt must leave half of max_new_tokens before it

    def __post_init__(self):
        self.max_context = self.verifier.max_context
        self.pad_id = _pad_id(self.verifier)
        self.config = _generation_config(self.verifier, self.max_new_tokens, self.temperature, self.top_p, self.pad_id)

    def use(self, engine) -> None:
        """Answer with ``engine``; its own context limit (a server's max_model_len) counts too."""
        self.engine = engine
        if engine.max_context is not None:
            self.max_context = min(self.max_context or engine.max_context, engine.max_context)

    @property
    def settings(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p) if self.temperature > 0 else 1.0,
            "seed": self.seed if self.temperature > 0 else None,  # greedy answers do not depend on the seed
        }

    def answer_batch(self, batch: list) -> list[list[int]]:
        """One batch through ``generate`` here (what the ``hf`` answer engine runs)."""
        return _answer_batch(self, batch)

    def too_long(self, ids: list[int]) -> str | None:
        """Why the prompt ``ids`` is not answered (the stats key counting it), or None."""
        if self.max_context is not None and len(ids) + self.max_new_tokens > self.max_context:
            return "too_long"
        if self.train_length is not None and len(ids) + -(-self.max_new_tokens // 2) > self.train_length:
            return "too_long_to_train"
        return None


class _Processes:
    """The processes answering together (one without an accelerator): shard c is process c mod N's."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank, self.world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


def generate_self_distillation(
    verifier,
    prompts: Iterable[str | Sequence[dict]] | str,
    output_dir: str | os.PathLike,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    shard_size: int = 64,
    progress: bool = True,
    accelerator=None,
    capture: tuple | None = None,
    engine: str = "hf",
    engine_options=None,
    train_length: int | None = None,
):
    """Let the verifier answer ``prompts`` and store the conversations under ``output_dir``.

    ``prompts``: strings or chat-turn lists, or a prompt source name for ``load_prompts`` (a
    jsonl file, a saved dataset, a hub dataset or ``"default"``). Returns every record stored in
    ``output_dir`` (earlier runs' too) as one ``datasets.Dataset`` with columns ``prompt_id``,
    ``messages`` (the prompt's turns plus the assistant's answer), ``input_ids`` (the encoded
    prompt followed by the answer ids, ending with eos when one was produced) and
    ``prompt_length``. Greedy when ``temperature`` is 0; otherwise sampled with temperature and
    top-p, seeded per batch (``hf``) or per request (other engines) from ``seed``. Every process of
    ``accelerator`` must call this with the same arguments; each answers its share of the shards,
    and all return the whole folder.
    ``capture``: ``(FeatureStore, aux_layer_ids, max_length)`` to store the verifier's features of
    each new conversation from the generation pass itself (EAGLE-3 training reads them; ``hf`` only).
    ``engine``: who writes the answers, ``hf`` (``model.generate`` here), ``openai`` (OpenAI-compatible
    servers) or ``vllm`` (``vllm.LLM`` here), with ``engine_options`` (``answer_engines.EngineOptions``);
    the records have the same form whichever wrote them, and a folder may be resumed with another.
    ``train_length``: the length training cuts conversations to (``data.max_length``). A prompt (or a
    later turn's prompt) that leaves less than half of ``max_new_tokens`` before it is skipped and
    counted: most of its answer would be generated only to be cut away, and one long prompt pads
    its whole batch (ShareGPT's longest first turns made 139 of the quick recipe's 246 seconds).
    """
    from tqdm.auto import tqdm

    from .answer_engines import build_engine, check_options

    _check_settings(max_new_tokens, temperature, top_p, batch_size, shard_size, seed)
    if engine_options is not None or engine != "hf":
        from .answer_engines import EngineOptions

        check_options(engine, engine_options or EngineOptions())
    if capture is not None and engine != "hf":
        raise SpecHeadsError(f"features can be captured during generation with engine hf only, not {engine}: "
                             f"leave capture out (training computes them in its first epoch)")
    if verifier.tokenizer is None:
        raise SpecHeadsError(f"verifier '{verifier.name}' has no tokenizer: self-distillation needs one to encode prompts")
    prompts = _read_prompts(prompts)
    output_dir = Path(output_dir)
    gen = _Generation(verifier, max_new_tokens, temperature, top_p, seed, batch_size, capture, train_length=train_length)
    manifest = _open_folder(output_dir, _verifier_info(verifier), gen.settings)
    procs = _Processes(accelerator)
    procs.barrier()  # every process has checked the folder before the main process writes in it
    if procs.is_main:
        (output_dir / SHARDS).mkdir(parents=True, exist_ok=True)
        _clean_tmp(output_dir)
    procs.barrier()  # every process reads the folder only after the main process has cleaned it
    done = _list_stored(output_dir, manifest, warn=procs.is_main)
    if procs.is_main:
        write_json_atomic(output_dir / MANIFEST, manifest)
    procs.barrier()  # all have listed the same shards before any process writes a new one
    stored = list(manifest["shards"])

    todo = _not_yet_stored(prompts, done)
    skipped = len(prompts) - len(todo)
    mine = _my_shards(todo, shard_size, stored, procs)
    stats = {"prompts": 0, "generated_tokens": 0, "generate_seconds": 0.0, "too_long": 0, "too_long_to_train": 0, "shards": []}
    started = time.perf_counter()
    show = progress and procs.is_main
    if mine:  # an engine (a server check, a vLLM start) only when there is something to answer
        say = (lambda msg: print(f"[specheads] {msg}", file=sys.stderr, flush=True)) if show else None
        if engine_options is not None and procs.world > 1:  # concurrency counts the requests of all processes
            engine_options = dataclasses.replace(engine_options, concurrency=-(-engine_options.concurrency // procs.world))
        gen.use(build_engine(engine, gen, engine_options, say=say))
    desc = "self-distillation" if procs.world == 1 else f"self-distillation (process 0 of {procs.world})"
    bar = tqdm(total=sum(len(chunk) for _, chunk in mine), disable=not show, unit="prompt", desc=desc)
    try:
        for name, chunk in mine:
            records = _answer_shard(gen, chunk, stats, bar)
            if not records:
                continue
            _write_shard(output_dir / SHARDS, name, records)
            stats["prompts"] += len(records)
            stats["shards"].append({"name": name, "count": len(records), "engine": engine})
            if procs.world == 1:  # keeps the manifest current during a long run; with several writers the main process lists all at the end
                manifest["shards"].append(stats["shards"][-1])
                manifest["count"] += len(records)
                write_json_atomic(output_dir / MANIFEST, manifest)
    finally:
        bar.close()
        if gen.engine is not None:
            gen.engine.close()
    stats["wall_seconds"] = time.perf_counter() - started
    stats["engine"] = gen.engine.stats() if gen.engine is not None else {"engine": engine}
    stats = _gather_stats(stats, procs)
    if procs.is_main:
        _close_manifest(output_dir, manifest, stored, stats, skipped, gen, procs.world)
    procs.barrier()  # the manifest is complete before any process reads the folder back
    summary = gen.engine.summary() if gen.engine is not None else ""
    _report(stats, manifest, skipped, gen.max_context, output_dir, show=show, engine=summary, train_length=gen.train_length)
    if manifest["count"] == 0 and stats["too_long_to_train"]:
        raise SpecHeadsError(
            f"self-distillation answered none of the {stats['too_long_to_train'] + stats['too_long']} prompts: each one plus half of "
            f"max_new_tokens={max_new_tokens} exceeds the training length data.max_length={gen.train_length}; raise "
            "data.max_length or lower data.self_distill.max_new_tokens")
    return load_self_distilled(output_dir)


def _read_prompts(prompts) -> list:
    if isinstance(prompts, (str, os.PathLike)):
        prompts = load_prompts(str(prompts))
    prompts = [_check_prompt(p, i) for i, p in enumerate(prompts)]
    if not prompts:
        raise SpecHeadsError("no prompts to self-distil: the prompt list is empty")
    return prompts


def _open_folder(output_dir: Path, info: dict, settings: dict) -> dict:
    """The folder's manifest, or a new one; a folder made by another verifier or with other
    generation settings, or one that is not a self-distillation folder, is refused."""
    if output_dir.exists() and not output_dir.is_dir():
        raise SpecHeadsError(f"output_dir {output_dir} exists and is not a directory")
    manifest = _read_manifest(output_dir)
    if manifest is None:
        if output_dir.is_dir() and any(not p.name.startswith(TMP_PREFIX) for p in output_dir.iterdir()):
            raise SpecHeadsError(f"output_dir {output_dir} is not empty and has no {MANIFEST}: refusing to write into it")
        return {"format": FORMAT, "version": FORMAT_VERSION, "verifier": info, "generation": settings,
                "shards": [], "count": 0, "runs": []}
    old = manifest.get("verifier", {})
    if not _same_verifier(old, info):
        raise SpecHeadsError(
            f"output_dir {output_dir} was made by verifier '{old.get('name')}' (fingerprint {old.get('fingerprint')}, "
            f"tokenizer {old.get('tokenizer')}, eos {old.get('eos_token_ids')}), not by verifier '{info['name']}' "
            f"(fingerprint {info['fingerprint']}, tokenizer {info['tokenizer']}, eos {info['eos_token_ids']}): "
            f"use another output_dir"
        )
    if manifest.get("generation") != settings:
        raise SpecHeadsError(
            f"output_dir {output_dir} was generated with settings {manifest.get('generation')}, "
            f"but this run asks for {settings}: use the same settings or another output_dir"
        )
    return manifest


def _list_stored(output_dir: Path, manifest: dict, warn: bool) -> set[str]:
    """The prompt ids already stored. The shard folders are the truth: the manifest's list is set to them."""
    done: set[str] = set()
    shards = []
    engines = {s["name"]: s["engine"] for s in manifest.get("shards", []) if "engine" in s}
    for path in _shard_dirs(output_dir):
        ids = _load_shard(path)["prompt_id"]
        done.update(ids)
        shards.append({"name": path.name, "count": len(ids), **({"engine": engines[path.name]} if path.name in engines else {})})
    missing = {s["name"] for s in manifest.get("shards", [])} - {s["name"] for s in shards}
    if missing and warn:
        logger.warning("shards listed in %s but missing on disk (their prompts are redone): %s", output_dir / MANIFEST, sorted(missing))
    manifest["shards"], manifest["count"] = shards, sum(s["count"] for s in shards)
    return done


def _not_yet_stored(prompts: list, done: set[str]) -> list[tuple[str, Any]]:
    """(prompt_id, prompt) of each prompt not stored yet, repeats dropped, in input order."""
    todo, seen = [], set(done)
    for p in prompts:
        pid = prompt_id(p)
        if pid not in seen:
            seen.add(pid)
            todo.append((pid, p))
    return todo


def _my_shards(todo: list, shard_size: int, stored: list[dict], procs: _Processes) -> list[tuple[str, list]]:
    """(name, prompts) of this process's new shards. The name of shard c is fixed by c alone,
    whichever process writes it, so the folder is the same for any number of processes."""
    first = 1 + max((int(s["name"].split("-")[1]) for s in stored), default=-1)
    chunks = [todo[start: start + shard_size] for start in range(0, len(todo), shard_size)]
    return [(f"shard-{first + c:05d}", chunk) for c, chunk in enumerate(chunks) if c % procs.world == procs.rank]


def _answer_shard(gen: _Generation, chunk: list, stats: dict, bar) -> list[dict]:
    """The records of one shard's prompts, in input order; prompts that leave no room for
    ``max_new_tokens`` in the verifier's context (or the engine's) are counted and skipped.

    A ``{"user_turns": [...]}`` prompt is answered turn by turn, on policy: round r asks its r-th
    user turn after the verifier's own earlier answers, and its record is the whole conversation
    (the answers of every round are trained on). Each round's prompts go to the answer engine
    together (``gen.engine``: batches of ``hf``, or requests in flight on a server)."""
    from .answer_engines import Request

    scripts = [p["user_turns"] if isinstance(p, dict) else None for _, p in chunk]
    history: list[list[dict]] = [[] for _ in chunk]  # the turns answered so far
    done: dict[int, tuple[list[int], list[int], int]] = {}  # prompt -> (last prompt ids, answer, first prompt length)
    first_len: dict[int, int] = {}
    active = list(range(len(chunk)))
    shown = 0
    for r in range(max(len(t) for t in scripts if t) if any(scripts) else 1):
        encoded, requests = [], []
        for i in active:
            pid, p = chunk[i]
            if scripts[i] is not None:
                p = history[i] + [{"role": "user", "content": scripts[i][r]}]
            ids = gen.verifier.encode(p)
            why = gen.too_long(ids)
            if why:
                if i not in done:  # a later turn that does not fit ends the conversation where it is
                    stats[why] += 1
                continue
            first_len.setdefault(i, len(ids))
            encoded.append((i, _Prompt(pid, p, ids)))
            requests.append(Request(pid, r, ids, scripts[i] is None or r + 1 == len(scripts[i])))

        def answered(j: int) -> None:
            nonlocal shown
            if requests[j].final:
                bar.update(1)
                shown += 1

        t0 = time.perf_counter()
        answers = gen.engine.answer(requests, answered)
        stats["generate_seconds"] += time.perf_counter() - t0
        for (i, item), ans in zip(encoded, answers):
            done[i] = (item.ids, ans, first_len[i])
            stats["generated_tokens"] += len(ans)
            if scripts[i] is not None:
                history[i] = item.prompt + [{"role": "assistant", "content": gen.verifier.decode(ans)}]
        active = [i for i, _ in encoded if scripts[i] is not None and r + 1 < len(scripts[i])]
    bar.update(len(chunk) - shown)  # the prompts skipped as too long
    return [_record(gen.verifier, chunk[i], history[i], *done[i]) for i in range(len(chunk)) if i in done]


def _answer_batch(gen: _Generation, batch: list) -> list[list[int]]:
    """The verifier's answer ids to one batch of ``answer_engines.Request`` (engine ``hf``).
    Sampling is seeded by the batch's prompts, so a resumed or differently split run draws the
    same answers. With ``gen.capture`` the generation's own forwards also give every
    conversation's features, which are stored (for its last turn: earlier turns' are part of it)."""
    seed = _batch_seed(gen.seed, [item.pid for item in batch]) if gen.temperature > 0 else None
    prompts = [item.ids for item in batch]
    _check_batch_memory(gen, prompts)
    from .features import FeatureCapture, features_from_generation, tokens_key

    capture = FeatureCapture(gen.verifier.model, gen.capture[1]) if gen.capture is not None else contextlib.nullcontext()
    with _out_of_memory_named(gen, prompts), capture as cap:
        answers = _generate_batch(gen.verifier, prompts, gen.config, gen.pad_id, seed)
    if gen.capture is None:
        return answers
    store, _, max_length = gen.capture
    rows = features_from_generation(cap, max(map(len, prompts)), [len(p) for p in prompts], answers, max_length)
    store.put([(tokens_key((p + a)[: len(aux)]), aux, last, argmax)
               for p, a, (aux, last, argmax), item in zip(prompts, answers, rows, batch) if item.final])
    return answers


def _batch_bytes(gen: _Generation, prompts: list[list[int]]) -> int:
    """A rough upper estimate of what one generation batch holds at its end: the KV cache over
    prompt + answer, float32 scores and logits per step, the prefill's widest activation, and with
    capture every forward's aux and last hidden states."""
    cfg = gen.verifier.model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    item = torch.empty((), dtype=gen.verifier.dtype).element_size()
    B, width = len(prompts), max(map(len, prompts))
    L = width + gen.max_new_tokens
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * L * B * item
    scores = 2 * B * cfg.vocab_size * 4
    prefill = B * width * max(getattr(cfg, "intermediate_size", 4 * hidden), heads * width) * item * 3
    captured = B * L * (len(gen.capture[1]) + 1) * hidden * item if gen.capture is not None else 0
    return kv + scores + prefill + captured


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


def _too_large(gen: _Generation, prompts: list[list[int]], need: str) -> SpecHeadsError:
    return SpecHeadsError(
        f"self-distillation batch of {len(prompts)} prompts (the longest {max(map(len, prompts))} tokens, "
        f"+ {gen.max_new_tokens} new) {need} on {gen.verifier.device}: lower data.self_distill.batch_size "
        f"(now {gen.batch_size}) or max_new_tokens; shards already written are kept and a rerun resumes after them")


def _check_batch_memory(gen: _Generation, prompts: list[list[int]]) -> None:
    """Refuse a batch that cannot fit before it runs, rather than swap or be killed halfway."""
    free = _free_bytes(gen.verifier.device)
    need = _batch_bytes(gen, prompts)
    if free is not None and need > 0.9 * free:
        raise _too_large(gen, prompts, f"needs about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free")


@contextlib.contextmanager
def _out_of_memory_named(gen: _Generation, prompts: list[list[int]]):
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise _too_large(gen, prompts, "ran out of memory") from exc
    except RuntimeError as exc:
        if "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise _too_large(gen, prompts, "ran out of memory") from exc


def _record(verifier, prompt: tuple[str, Any], history: list[dict], ids: list[int], answer: list[int], first_len: int) -> dict:
    """One stored conversation: its turns and token ids, the prompt being what came before the first
    answer (for a multi-turn conversation the later user turns sit among the trained answers)."""
    pid, p = prompt
    if isinstance(p, dict):
        turns = history
    else:
        turns = ([{"role": "user", "content": p}] if isinstance(p, str) else list(p)) + [{"role": "assistant", "content": verifier.decode(answer)}]
    return {"prompt_id": pid, "messages": turns, "input_ids": list(ids) + answer, "prompt_length": min(first_len, len(ids))}


def _write_shard(folder: Path, name: str, records: list[dict]) -> None:
    """Saved under a temporary name, then renamed: a shard exists complete or not at all."""
    from datasets import Dataset

    features = _features()
    tmp = folder / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    with _quiet_datasets():
        Dataset.from_dict({k: [r[k] for r in records] for k in features}, features=features).save_to_disk(str(tmp))
    os.replace(tmp, folder / name)


def _gather_stats(stats: dict, procs: _Processes) -> dict:
    """Every process's counts summed, and its new shards listed (the processes ran side by side)."""
    if procs.world == 1:
        return stats
    from accelerate.utils import gather_object

    every = gather_object([stats])
    total = {k: sum(s[k] for s in every) for k in ("prompts", "generated_tokens", "too_long", "too_long_to_train")}
    total["shards"] = [shard for s in every for shard in s["shards"]]
    total["generate_seconds"] = max(s["generate_seconds"] for s in every)
    total["wall_seconds"] = max(s["wall_seconds"] for s in every)
    total["engine"] = dict(every[0]["engine"])
    counts = [s["engine"]["token_ids"] for s in every if "token_ids" in s["engine"]]
    if counts:
        total["engine"]["token_ids"] = {k: sum(c[k] for c in counts) for k in counts[0]}
    if "retries" in total["engine"]:
        total["engine"]["retries"] = sum(s["engine"].get("retries", 0) for s in every)
    procs.barrier()
    return total


def _tokens_per_s(stats: dict) -> float:
    return stats["generated_tokens"] / stats["generate_seconds"] if stats["generate_seconds"] > 0 else 0.0


def _close_manifest(output_dir: Path, manifest: dict, stored: list[dict], stats: dict, skipped: int, gen: _Generation, world: int) -> None:
    """The manifest lists every shard (in name order) and this run's counts and throughput."""
    if world > 1:  # the shards found at the start plus every process's new ones
        shards = sorted(stored + stats["shards"], key=lambda s: s["name"])
        manifest["shards"], manifest["count"] = shards, sum(s["count"] for s in shards)
    verifier = gen.verifier
    run = {
        "prompts": stats["prompts"], "skipped_already_stored": skipped, "skipped_too_long": stats["too_long"], "skipped_too_long_to_train": stats["too_long_to_train"],
        "generated_tokens": stats["generated_tokens"], "generate_seconds": round(stats["generate_seconds"], 3),
        "tokens_per_s": round(_tokens_per_s(stats), 2), "wall_seconds": round(stats["wall_seconds"], 3), "num_processes": world,
    }
    engine = stats["engine"]
    if engine["engine"] == "hf":  # the verifier here wrote the answers
        run.update(engine="hf", batch_size=gen.batch_size, dtype=str(verifier.dtype).replace("torch.", ""), device=str(verifier.device))
    else:  # a server or vLLM did; the verifier here only encoded and decoded
        run.update(engine)
    manifest.setdefault("runs", []).append(run)
    write_json_atomic(output_dir / MANIFEST, manifest)


def _report(stats: dict, manifest: dict, skipped: int, max_context, output_dir: Path, show: bool, engine: str = "",
            train_length: int | None = None) -> None:
    message = (
        f"self-distillation: {stats['prompts']} prompts answered ({skipped} already stored"
        + (f", {stats['too_long']} skipped: prompt + max_new_tokens > context {max_context}" if stats["too_long"] else "")
        + (f", {stats['too_long_to_train']} skipped: prompt + max_new_tokens / 2 > the training length {train_length}"
           if stats.get("too_long_to_train") else "")
        + f"), {stats['generated_tokens']} tokens in {stats['generate_seconds']:.1f} s = {_tokens_per_s(stats):.1f} tokens/s"
        + (f" (engine {stats['engine']['engine']}{engine})" if stats["engine"]["engine"] != "hf" else "")
        + f"; {manifest['count']} records in {output_dir}"
    )
    logger.info(message)
    if show:
        print(f"[specheads] {message}", file=sys.stderr, flush=True)


def last_run_stats(output_dir: str | os.PathLike) -> dict | None:
    """Counts and throughput of the latest ``generate_self_distillation`` run in ``output_dir``."""
    manifest = _read_manifest(Path(output_dir))
    runs = (manifest or {}).get("runs") or []
    return runs[-1] if runs else None


# ----------------------------------------------------------------------------- conversations


def _records_from_source(source) -> tuple[Iterable[dict], str]:
    """(records, a name for messages) from a file, a saved dataset, a hub dataset, ShareGPT or a Dataset."""
    from datasets import Dataset, DatasetDict

    from .sharegpt import first_exchanges, is_sharegpt_source, sharegpt_path, source_path

    if isinstance(source, Dataset):
        return source, f"<Dataset with {len(source)} rows>"
    if isinstance(source, (list, tuple)):
        return source, f"<list of {len(source)} records>"
    if not isinstance(source, (str, os.PathLike)):
        raise SpecHeadsError(f"conversation source must be a path, a dataset name or a Dataset, got {source!r}")
    name = str(source)
    if is_sharegpt_source(name):  # read lazily, so a limit stops reading early
        path = sharegpt_path(source_path(name))
        return first_exchanges(path), f"ShareGPT {path}"
    if name.endswith((".jsonl", ".json")):
        if not os.path.isfile(name):
            raise SpecHeadsError(f"conversation file not found: {name}")
        with open(name, encoding="utf-8") as f:
            text = f.read()
        if name.endswith(".json") and text.lstrip().startswith("["):
            try:
                return json.loads(text), name
            except json.JSONDecodeError as exc:
                raise SpecHeadsError(f"{name} is not valid JSON: {exc}") from exc
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SpecHeadsError(f"{name}:{lineno} is not valid JSON: {exc}") from exc
        return records, name
    if name.endswith(".parquet"):
        if not os.path.isfile(name):
            raise SpecHeadsError(f"conversation file not found: {name}")
        import pyarrow.parquet as pq

        return pq.read_table(name).to_pylist(), name
    if os.path.isdir(name):
        from datasets import load_from_disk

        try:
            data = load_from_disk(name)
        except FileNotFoundError as exc:
            raise SpecHeadsError(f"{name} is neither a self-distillation directory nor a saved dataset ({exc})") from exc
    elif name.startswith((".", "/", "~")):
        raise SpecHeadsError(f"conversation source not found: {name}")
    else:
        from datasets import load_dataset

        hub, _, split = name.partition(":")
        try:
            data = load_dataset(hub, split=split or "train")
        except Exception as exc:  # datasets raises many types for "not found / offline"
            raise SpecHeadsError(f"cannot load conversations from '{name}': not a file, a saved dataset or a reachable hub dataset ({exc})") from exc
    if isinstance(data, DatasetDict):
        if "train" in data:
            data = data["train"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise SpecHeadsError(f"saved dataset {name} has splits {sorted(data)}: name one as a saved folder of its own")
    return data, name


def _chat_ids(tokenizer, turns, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize_conversation(verifier, turns: list[dict]) -> tuple[list[int], int] | None:
    """(input_ids, prompt_length) of normalised turns, or None without an assistant turn after a prompt."""
    first = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), None)
    if first is None or first == 0:
        return None
    full = _chat_ids(verifier.tokenizer, turns, add_generation_prompt=False)
    prompt = _chat_ids(verifier.tokenizer, turns[:first], add_generation_prompt=True)
    if full[: len(prompt)] == prompt:
        return full, len(prompt)
    # A template that writes the prompt differently once an answer follows: the common prefix is prompt.
    common = 0
    for a, b in zip(full, prompt):
        if a != b:
            break
        common += 1
    return full, common


def load_conversations(source, verifier, *, max_length: int | None = None, limit: int | None = None):
    """Conversations as a ``datasets.Dataset`` with ``input_ids`` and ``prompt_length`` columns.

    ``source``: a self-distillation directory, a jsonl / json / parquet file, a ``save_to_disk``
    folder, a hub dataset (``name`` or ``name:split``), ``sharegpt`` / ``sharegpt:PATH``, a
    ``datasets.Dataset`` or a list of records. Records carry ``messages`` (role/content) or
    ShareGPT ``conversations`` (from/value); records without an assistant turn after a prompt are
    skipped (and counted). ``max_length`` truncates each conversation; one left with no answer
    token is skipped. ``limit``: keep the first ``limit`` usable conversations (the rest is not read).
    """
    from datasets import Dataset

    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise SpecHeadsError(f"max_length must be an integer >= 2, got {max_length!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpecHeadsError(f"number of conversations must be a positive integer, got {limit!r}")
    if verifier.tokenizer is None:
        raise SpecHeadsError(f"verifier '{verifier.name}' has no tokenizer: conversations cannot be tokenised")

    input_ids: list[list[int]] = []
    prompt_lengths: list[int] = []
    skipped = {"no assistant turn": 0, "nothing left to train on after truncation to max_length": 0}

    def add(ids, plen):
        if max_length is not None:
            ids, plen = ids[:max_length], min(plen, max_length)
        if plen >= len(ids):
            skipped["nothing left to train on after truncation to max_length"] += 1
            return
        input_ids.append(list(ids))
        prompt_lengths.append(int(plen))

    stored = None
    if isinstance(source, (str, os.PathLike)) and is_self_distilled(source):
        manifest = _read_manifest(Path(source))
        data = load_self_distilled(source)
        name = str(source)
        if _same_verifier(manifest.get("verifier", {}), _verifier_info(verifier)):
            stored = data
        else:
            logger.warning("%s was generated by verifier '%s', not '%s': re-tokenising its messages with this verifier's chat template",
                           name, manifest.get("verifier", {}).get("name"), verifier.name)
            records = data.select_columns(["messages"])
    else:
        records, name = _records_from_source(source)

    if stored is not None:
        for ids, plen in zip(stored["input_ids"], stored["prompt_length"]):
            if limit is not None and len(input_ids) >= limit:
                break
            add(ids, plen)
    else:
        if not getattr(verifier.tokenizer, "chat_template", None):
            raise SpecHeadsError(f"verifier '{verifier.name}' has no chat template, so the conversations in {name} cannot be tokenised")
        for index, record in enumerate(records):
            if limit is not None and len(input_ids) >= limit:
                break
            record = dict(record)
            turns = record.get("messages") if record.get("messages") is not None else record.get("conversations")
            if turns is None:
                raise SpecHeadsError(f"{name}: record {index} has no 'messages' or 'conversations' field (keys {sorted(record)})")
            if isinstance(turns, str):  # some datasets store the turns as a JSON string
                try:
                    turns = json.loads(turns)
                except json.JSONDecodeError as exc:
                    raise SpecHeadsError(f"{name}: record {index} has turns that are neither a list nor JSON: {turns[:80]!r}") from exc
            if not isinstance(turns, list):
                raise SpecHeadsError(f"{name}: record {index} has turns of type {type(turns).__name__}, not a list: {turns!r}")
            result = tokenize_conversation(verifier, _normalise_turns(turns, f"{name}: record {index}"))
            if result is None:
                skipped["no assistant turn"] += 1
                continue
            add(*result)

    dropped = {k: v for k, v in skipped.items() if v}
    if dropped:
        detail = ", ".join(f"{v} with {k}" for k, v in dropped.items())
        logger.warning("%s: skipped %d records (%s)", name, sum(dropped.values()), detail)
        print(f"[specheads] {name}: skipped {sum(dropped.values())} records ({detail})", file=sys.stderr, flush=True)
    if not input_ids:
        why = f" ({', '.join(f'{v} with {k}' for k, v in dropped.items())})" if dropped else ""
        raise SpecHeadsError(f"no usable conversations in {name}{why}")
    return Dataset.from_dict({"input_ids": input_ids, "prompt_length": prompt_lengths}, features=_token_features())


def split_train_eval(dataset, eval_fraction: float = 0.05, seed: int = 0):
    """A deterministic (train, eval) split; eval gets at least one example, train keeps at least one."""
    import random

    n = len(dataset)
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise SpecHeadsError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction!r}")
    if n < 2:
        raise SpecHeadsError(f"cannot split a dataset of {n} example(s) into train and eval: need at least 2")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    eval_idx = sorted(random.Random(seed).sample(range(n), n_eval))
    chosen = set(eval_idx)
    train_idx = [i for i in range(n) if i not in chosen]
    return dataset.select(train_idx), dataset.select(eval_idx)
