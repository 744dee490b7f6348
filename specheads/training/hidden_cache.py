"""An on-disk cache of the frozen verifier's last hidden states, one row per training token.

With a frozen verifier (Medusa-1) the hidden states of an example never change, so epochs after
the first need not run the verifier again: each example's rows are written the first time it is
seen and read back afterwards. Rows are kept in the verifier's dtype, so training with the cache
matches training without it up to float rounding (a forward over a differently padded batch). Storage is a flat ``torch.from_file`` memory map plus
a per-example "filled" flag file; processes write disjoint examples. ``key`` names what the rows
were computed from (the loop passes a hash of the verifier's fingerprint and every training
token): a cache opened with another key is refused, so recipes over the same data and verifier
can share one folder safely.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..errors import SpecHeadsError


class HiddenStateCache:
    def __init__(self, path: str, lengths: list[int], hidden_size: int, dtype: torch.dtype, create: bool = True, key: str = ""):
        self.path = path
        self.lengths = lengths
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        total = self.offsets[-1]
        self.hidden_size = hidden_size
        self.dtype = dtype
        meta = {"tokens": total, "examples": len(lengths), "hidden_size": hidden_size, "dtype": str(dtype), "key": key}
        meta_path = os.path.join(path, "meta.json")
        data_path, flags_path = os.path.join(path, "hidden.bin"), os.path.join(path, "filled.bin")
        if create and os.path.isfile(meta_path) and "key" not in _read(meta_path):
            os.remove(meta_path)  # written before caches were keyed: its rows cannot be vouched for, so rebuild
        if create and not os.path.isfile(meta_path):
            os.makedirs(path, exist_ok=True)
            for p, nbytes in ((data_path, total * hidden_size * _itemsize(dtype)), (flags_path, len(lengths))):
                with open(p, "wb") as f:
                    f.truncate(nbytes)
            with open(meta_path, "w") as f:
                json.dump(meta, f)
        if _read(meta_path) != meta:
            raise SpecHeadsError(
                f"hidden-state cache {path} was made for other data or another verifier; delete it or set training.hidden_cache_dir elsewhere"
            )
        self.data = torch.from_file(data_path, shared=True, size=total * hidden_size, dtype=dtype).view(total, hidden_size)
        self.filled = torch.from_file(flags_path, shared=True, size=len(lengths), dtype=torch.uint8)

    @staticmethod
    def describe(lengths: list[int], hidden_size: int, dtype: torch.dtype) -> str:
        per_token = hidden_size * _itemsize(dtype)
        total = sum(lengths) * per_token
        return f"{per_token} bytes per token x {sum(lengths)} tokens = {total / 2**20:.1f} MiB"

    def has(self, indices: list[int]) -> bool:
        return bool(self.filled[indices].all())

    def load(self, indices: list[int], max_len: int, device) -> torch.Tensor:
        """[B, max_len, H], zero rows past each example's end (padding, masked out by the loss)."""
        out = torch.zeros(len(indices), max_len, self.hidden_size, dtype=self.dtype)
        for i, ex in enumerate(indices):
            n = self.lengths[ex]
            out[i, :n] = self.data[self.offsets[ex] : self.offsets[ex] + n]
        return out.to(device)

    def store(self, indices: list[int], hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to("cpu", self.dtype)
        for i, ex in enumerate(indices):
            n = self.lengths[ex]
            self.data[self.offsets[ex] : self.offsets[ex] + n] = hidden[i, :n]
            self.filled[ex] = 1


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def cache_key(verifier_fingerprint: dict, token_rows) -> str:
    """A hash of the verifier's fingerprint and every example's token ids, in order."""
    h = hashlib.sha256(json.dumps(verifier_fingerprint, sort_keys=True).encode())
    for ids in token_rows:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
