"""What the frozen verifier gives each token of a conversation, on disk, found by the tokens.

An EAGLE-3 drafter trains on the verifier's hidden states at a few layers (the aux layers), its
last hidden state (whose product with the LM head is the target distribution) and its argmax, at
every position. They never change for a given verifier and token sequence, so they are computed
once, wherever that happens first: while the verifier writes its own answers (self-distillation
captures them in the generation pass itself, ``FeatureCapture``), or in the first training epoch
(a forward over the batch), and read back afterwards, by any recipe and any data split.

Layout: ``<root>/<dtype>-aux<ids>-<key>/`` holds ``meta.json`` (what the features were computed
with: the verifier's fingerprint, the dtype, the aux layer ids, the row width) and, per writing
process, append-only segments: ``seg-*.rows`` (rows of ``(n_aux + 1) * H`` values in the
verifier's dtype), ``seg-*.argmax`` (int64) and ``seg-*.index.json`` (sha1 of a conversation's
token ids -> [first row, row count]). ``key`` hashes everything in ``meta.json``, so features of
another verifier, dtype or aux layers live in another folder and are never read by mistake; a run
that finds only those says why it cannot reuse them. Rows are appended before the index that
names them is rewritten (atomically), so a killed writer leaves at worst rows nobody reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path

import torch

from ..atomic_files import write_json_atomic
from ..errors import SpecHeadsError


def tokens_key(ids) -> str:
    """The name a token sequence is stored under."""
    return hashlib.sha1(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class FeatureStore:
    """Per-token verifier features, keyed by the whole token sequence (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, verifier, aux_layer_ids: list[int], *, say=None):
        from ..model_id import weights_sha256

        say = say or (lambda msg: print(f"[specheads] {msg}", file=sys.stderr, flush=True))
        self.aux_layer_ids = [int(i) for i in aux_layer_ids]
        self.hidden_size = int(verifier.hidden_size)
        self.n_aux = len(self.aux_layer_ids)
        self.width = (self.n_aux + 1) * self.hidden_size
        self.dtype = verifier.dtype
        self.meta = {
            "format": "specheads.features", "version": 1,
            # every tensor's sample, not only the LM head's: a LoRA-adapted verifier has other features
            "verifier": {**verifier.fingerprint(), "weights_sha256": weights_sha256(verifier.model)}, "verifier_name": str(verifier.name),
            "dtype": str(self.dtype).replace("torch.", ""), "aux_layer_ids": self.aux_layer_ids,
            "hidden_size": self.hidden_size, "row_width": self.width,
        }
        key = hashlib.sha256(json.dumps({k: v for k, v in self.meta.items() if k != "verifier_name"}, sort_keys=True).encode()).hexdigest()[:12]
        self.root = Path(root)
        self.path = self.root / f"{self.meta['dtype']}-aux{'.'.join(map(str, self.aux_layer_ids))}-{key}"
        if not (self.path / "meta.json").is_file():
            others = self._others()
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / "meta.json", self.meta)
            for folder, why in others:
                say(f"features in {folder} are not reused: {why}")
        self.index: dict[str, tuple[str, int, int]] = {}  # tokens key -> (segment, first row, rows)
        self._seen: dict[str, float] = {}  # index file -> mtime read
        self._segment: str | None = None  # this process's segment, made on its first put
        self._segment_rows = 0
        self._segment_index: dict[str, list[int]] = {}
        self.refresh()

    def _others(self) -> list[tuple[Path, str]]:
        """Feature folders under the root that this run cannot use, and why."""
        out = []
        if not self.root.is_dir():
            return out
        for folder in sorted(p for p in self.root.iterdir() if (p / "meta.json").is_file()):
            try:
                other = json.loads((folder / "meta.json").read_text())
            except (OSError, ValueError):
                out.append((folder, "its meta.json is unreadable"))
                continue
            diffs = []
            if other.get("verifier") != self.meta["verifier"]:
                diffs.append(f"another verifier ({other.get('verifier_name')!r}, this run's is {self.meta['verifier_name']!r})")
            for field in ("dtype", "aux_layer_ids", "hidden_size"):
                if other.get(field) != self.meta[field]:
                    diffs.append(f"{field} {other.get(field)} (this run: {self.meta[field]})")
            if diffs:
                out.append((folder, "computed with " + ", ".join(diffs)))
        return out

    # -- reading ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the index files that are new or changed (other processes append too)."""
        for f in self.path.glob("seg-*.index.json"):
            mtime = f.stat().st_mtime
            if self._seen.get(f.name) == mtime:
                continue
            try:
                entries = json.loads(f.read_text())
            except (OSError, ValueError):
                continue  # being replaced: read at the next refresh
            segment = f.name[: -len(".index.json")]
            for k, (first, n) in entries.items():
                self.index[k] = (segment, int(first), int(n))
            self._seen[f.name] = mtime

    def has(self, key: str) -> bool:
        if key not in self.index:
            self.refresh()
        return key in self.index

    def _read(self, segment: str, suffix: str, first: int, n: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        size = _itemsize(dtype)
        with open(self.path / f"{segment}.{suffix}", "rb") as f:
            f.seek(first * width * size)
            buf = f.read(n * width * size)
        if len(buf) != n * width * size:
            raise SpecHeadsError(f"feature segment {self.path / segment}.{suffix} is shorter than its index says: delete {self.path}")
        return torch.frombuffer(bytearray(buf), dtype=dtype).view(n, width)

    def get(self, keys: list[str], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(aux [B, max_len, n_aux * H], last hidden [B, max_len, H], argmax [B, max_len]) of stored
        sequences; zero rows past each sequence's end (padding, masked by the loss)."""
        rows = torch.zeros(len(keys), max_len, self.width, dtype=self.dtype)
        argmax = torch.zeros(len(keys), max_len, dtype=torch.long)
        for b, k in enumerate(keys):
            segment, first, n = self.index[k]
            n = min(n, max_len)
            rows[b, :n] = self._read(segment, "rows", first, n, self.width, self.dtype)
            argmax[b, :n] = self._read(segment, "argmax", first, n, 1, torch.int64)[:, 0]
        rows = rows.to(device)
        split = self.n_aux * self.hidden_size
        return rows[..., :split], rows[..., split:], argmax.to(device)

    # -- writing ------------------------------------------------------------------------------
    def put(self, items: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Store ``(key, aux [T, n_aux * H], last [T, H], argmax [T])`` for each sequence."""
        items = [it for it in items if it[0] not in self.index]
        if not items:
            return
        if self._segment is None:
            self._segment = f"seg-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        base = self.path / self._segment
        with open(f"{base}.rows", "ab") as rows_f, open(f"{base}.argmax", "ab") as arg_f:
            for key, aux, last, argmax in items:
                row = torch.cat([aux, last], -1).detach().to("cpu", self.dtype).contiguous()
                if row.shape[-1] != self.width:
                    raise SpecHeadsError(f"features of width {row.shape[-1]} for a store of width {self.width}")
                rows_f.write(row.view(torch.int8 if self.dtype.itemsize == 1 else torch.int16 if self.dtype.itemsize == 2 else torch.int32).numpy().tobytes())
                arg_f.write(argmax.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
                self._segment_index[key] = [self._segment_rows, int(row.shape[0])]
                self.index[key] = (self._segment, self._segment_rows, int(row.shape[0]))
                self._segment_rows += int(row.shape[0])
            rows_f.flush()
            arg_f.flush()
            os.fsync(rows_f.fileno())
            os.fsync(arg_f.fileno())
        write_json_atomic(f"{base}.index.json", self._segment_index)  # rows first, then the index naming them

    def describe(self) -> str:
        per_token = self.width * _itemsize(self.dtype) + 8
        return f"{self.path}: {len(self.index)} sequences stored, {per_token} bytes per token"


class FeatureCapture:
    """Hooks on a verifier that record, for every forward of a generation, the aux layers' inputs,
    the last (normed) hidden state and the argmax of the logits, so that self-distillation stores
    the features of the conversations it writes without a second forward over them.

    ``aux_layer_ids`` index transformers' ``hidden_states`` (id i is the input to decoder layer i;
    id N, the number of layers, is the final norm's output)."""

    def __init__(self, model, aux_layer_ids: list[int]):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        layers = getattr(decoder, "layers", None)
        norm = getattr(decoder, "norm", None)
        if layers is None or norm is None:
            raise SpecHeadsError(f"{type(model).__name__} has no decoder layers / final norm to capture features from")
        self.model, self.layers, self.norm = model, layers, norm
        self.aux_layer_ids = list(aux_layer_ids)
        self.head = model.get_output_embeddings()

    def __enter__(self):
        self.aux: dict[int, list[torch.Tensor]] = {i: [] for i in self.aux_layer_ids}
        self.last: list[torch.Tensor] = []
        self.argmax: list[torch.Tensor] = []
        handles = []
        for i in self.aux_layer_ids:
            if i < len(self.layers):
                def pre(module, args, kwargs, i=i):
                    self.aux[i].append((args[0] if args else kwargs["hidden_states"]).detach())
                handles.append(self.layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(self.norm.register_forward_hook(lambda m, a, out: self.last.append(out.detach())))
        handles.append(self.head.register_forward_hook(lambda m, a, out: self.argmax.append(out.detach().argmax(-1))))
        self._handles = handles
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(aux [B, L, n_aux * H], last [B, L, H], argmax of the logits at each forward's last
        position [B, steps]) over the L positions the forwards ran."""
        last = torch.cat(self.last, 1)
        aux = [last if i >= len(self.layers) else torch.cat(self.aux[i], 1) for i in self.aux_layer_ids]
        return torch.cat(aux, -1), last, torch.cat([a[:, -1:] for a in self.argmax], 1)


UNKNOWN_ARGMAX = -1  # a position whose logits no forward computed


def features_from_generation(capture: FeatureCapture, width: int, prompt_lengths: list[int], answers: list[list[int]],
                             max_length: int | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per conversation of a left-padded generation batch (prompts padded to ``width``): the
    positions' rows in sequence order, cut to ``max_length``. Position t's row comes from the
    forward that ran token t: the prefill for prompt tokens, decode step j for answer token j - 1.
    The last token of a conversation is never run (nothing is generated after it), and no loss
    reads its row, so it is zero. The argmax at the last prompt position and at every answer
    position is the logits' own (the next token when greedy); ``generate`` computes no logits at
    the other prompt positions (a later turn's prompt holds earlier answers), so their argmax is
    UNKNOWN_ARGMAX: trained on (the target distribution comes from the hidden state), not evaluated."""
    aux, last, argmax = capture.rows()
    out = []
    for b, (p, answer) in enumerate(zip(prompt_lengths, answers)):
        total = p + len(answer)
        keep = total if max_length is None else min(total, max_length)
        ran = min(keep, p + max(0, len(answer) - 1), aux.shape[1] - (width - p))  # positions with a forward
        cols = slice(width - p, width - p + ran)
        a = torch.zeros(keep, aux.shape[-1], dtype=aux.dtype)
        h = torch.zeros(keep, last.shape[-1], dtype=last.dtype)
        a[:ran], h[:ran] = aux[b, cols].cpu(), last[b, cols].cpu()
        m = torch.full((keep,), UNKNOWN_ARGMAX, dtype=torch.long)
        # argmax[b, 0] is the prefill's (at the last prompt position), argmax[b, j] decode step j's
        steps = min(keep - (p - 1), argmax.shape[1]) if keep >= p else 0
        if steps > 0:
            m[p - 1 : p - 1 + steps] = argmax[b, :steps].cpu()
        out.append((a, h, m))
    return out
