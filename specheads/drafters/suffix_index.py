"""Token indexes for suffix drafting: where a pattern occurs, and what followed it.

Both kinds answer the same three questions, so the suffix drafter can sum their counts:

* ``longest_suffix(context, max_len)``: the length of the longest suffix of ``context`` that
  occurs in the index followed by at least one more token, and a state standing for its
  occurrences;
* ``expand(state, fraction)`` / ``child(state, token)``: how many occurrences go on to a next
  token (``known``) and which tokens those are (those with at least ``fraction`` of them), with
  their counts and child states.

``SuffixArray`` holds a frozen corpus (a training corpus built offline, or the earlier requests
of this process): the sequences concatenated, each followed by ``SEP``, and the start positions
of their suffixes sorted by the first ``sort_depth`` tokens (ties by position). Every occurrence
of a pattern is then one contiguous range, and inside it the suffixes are sorted by what follows
the pattern, so the continuations of a pattern are nested sub-ranges: a suffix tree, walked
through a flat array. It is built by prefix doubling with numpy sorts (no per-n-gram Python
objects) and saved as safetensors with a JSON header naming the verifier it was built for.

``TokenBuffer`` holds a sequence that grows while decoding (the current request, recent
requests) and is searched by scanning it with numpy.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import SpecHeadsError

SEP = -1  # ends every sequence in a corpus; never part of a pattern, never drafted
FORMAT = "specheads.suffix_index"
FORMAT_VERSION = 1
DEFAULT_SORT_DEPTH = 64
_GATHER = 1024  # expand reads ranges up to this size whole; larger ones are searched
_SAMPLE = 256  # keys read per value and level of a search (fewer: more levels, fewer random reads)


class SuffixArray:
    """A frozen corpus and its suffix array (see the module docstring). States are (lo, hi, depth):
    the suffixes ``sa[lo:hi]`` all start with the same ``depth`` tokens."""

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, sort_depth: int, meta: dict | None = None):
        self.tokens = tokens  # int32, SEP-terminated sequences
        self.sa = sa
        self.sort_depth = int(sort_depth)
        self.meta = meta or {}
        self.path: str | None = None  # the file it was loaded from
        n = tokens.size
        # Ranks: SEP (and the padding past the end) is 0, token t is t + 1, so SEP sorts first.
        self._rank = np.zeros(n + self.sort_depth + 1, dtype=np.int64)
        self._rank[:n] = tokens.astype(np.int64) + 1
        self._max_rank = int(self._rank.max()) if n else 0
        self._bits, self._width = _packing(max(self._max_rank, 1), self.sort_depth)
        self._packed = _pack(self._rank, self._bits, self._width)
        self._packed_sa = self._packed[sa] if n else np.zeros(0, dtype=np.uint64)
        self._top = (1 << self._bits) - 1  # at least every rank: pads the upper bound of a short chunk

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]], sort_depth: int = DEFAULT_SORT_DEPTH, meta: dict | None = None) -> "SuffixArray":
        if isinstance(sort_depth, bool) or not isinstance(sort_depth, int) or sort_depth < 1:
            raise SpecHeadsError(f"sort_depth must be a positive integer, got {sort_depth!r}")
        parts = []
        for seq in sequences:
            arr = np.asarray(seq, dtype=np.int64).reshape(-1)
            if arr.size == 0:
                continue
            if int(arr.min()) < 0:
                raise SpecHeadsError(f"token ids must be >= 0, got {int(arr.min())}")
            parts.append(arr.astype(np.int32))
            parts.append(np.array([SEP], dtype=np.int32))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls(tokens, suffix_array(tokens, sort_depth), sort_depth, meta)

    @property
    def num_tokens(self) -> int:
        """Tokens without the separators."""
        return int(self.tokens.size - np.count_nonzero(self.tokens == SEP))

    # -- queries ----------------------------------------------------------------------------
    def find(self, pattern: np.ndarray):
        """The range of suffixes starting with ``pattern`` (its ranks: token + 1; at most
        sort_depth of them, past which the array is not sorted), or None."""
        lo, hi = 0, self.sa.size
        w = self._width
        if pattern.size == 0 or int(pattern.max()) > self._max_rank:  # a token the corpus lacks (and packing could not hold)
            return None
        for o in range(0, pattern.size, w):
            chunk = pattern[o : o + w]
            low, high = _pack_one(chunk, 0, self._bits, w), _pack_one(chunk, self._top, self._bits, w)
            if o == 0:
                lo, hi = self._packed_sa.searchsorted(low, "left"), self._packed_sa.searchsorted(high, "right")
            else:
                lo, hi = self._search(self._packed, lo, hi, o, [low, high], [False, True]).tolist()
            if lo >= hi:
                return None
        return (int(lo), int(hi), pattern.size)

    def longest_suffix(self, context: np.ndarray, max_len: int):
        """(length, state) of the longest suffix of ``context`` (ranks) of at most ``max_len``
        tokens that occurs followed by a token (a match only at a sequence's end has nothing to
        draft); (0, None) when even its last token does not."""
        def occurs(length):
            state = self.find(context[context.size - length :])
            return state if state is not None and self._rank[self.sa[state[1] - 1] + length] != 0 else None

        top = min(max_len, context.size, self.sort_depth)
        if top <= 0:
            return 0, None
        state = occurs(top)  # the caller's bound is often exact: the match grew with the context
        if state is not None:
            return top, state
        best, lo, hi = (0, None), 1, top - 1
        while lo <= hi:  # occurring is monotone: a suffix of an occurring pattern occurs
            mid = (lo + hi) // 2
            state = occurs(mid)
            if state is not None:
                best, lo = (mid, state), mid + 1
            else:
                hi = mid - 1
        return best

    def expand(self, state, fraction: float):
        """(known, [(token, count, child state)]): ``known`` counts the occurrences of ``state``
        followed by a token (not by SEP); the list holds the continuations with at least
        ``fraction`` × known of them, most frequent first."""
        lo, hi, depth = state
        if depth >= self.sort_depth:
            return 0, []
        m = hi - lo
        if m <= _GATHER:
            keys = self._rank[self.sa[lo:hi] + depth]
            bounds = [0, *(np.nonzero(keys[1:] != keys[:-1])[0] + 1).tolist(), m]
            known = m - (bounds[1] if keys[0] == 0 else 0)
            need = _min_count(fraction, known)
            out = [(int(keys[a]) - 1, b - a, (lo + a, lo + b, depth + 1)) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= need and keys[a]]
        else:
            ended = 0 if self._rank[self.sa[lo] + depth] else int(self._search(self._rank, lo, hi, depth, [0], [True])[0]) - lo
            known = m - ended
            need = _min_count(fraction, known)
            # A run of c equal keys holds at least c // stride of every stride-th key: sample four
            # times per `need` keys and search only the values sampled often enough.
            stride = max(1, need // 4)
            sample = self._rank[self.sa[np.arange(lo + ended, hi, stride)] + depth]
            values, hits = np.unique(sample, return_counts=True)
            values = values[hits >= need // stride]
            ends = self._search(self._rank, lo, hi, depth, np.concatenate([values, values]),
                                np.repeat([False, True], values.size)).reshape(2, -1).T.tolist()
            out = [(r - 1, b - a, (a, b, depth + 1)) for r, (a, b) in zip(values.tolist(), ends) if b - a >= need]
        out.sort(key=lambda c: (-c[1], c[0]))
        return known, out

    def child(self, state, token: int):
        """(count, child state) of one continuation ``token`` of ``state`` (count 0: none)."""
        lo, hi, depth = state
        if depth >= self.sort_depth:
            return 0, None
        a, b = self._search(self._rank, lo, hi, depth, [token + 1, token + 1], [False, True]).tolist()
        return b - a, (a, b, depth + 1)

    def _search(self, keys: np.ndarray, lo: int, hi: int, offset: int, values, right) -> np.ndarray:
        """Where each of ``values`` goes among the sorted keys[sa[i] + offset], i in [lo, hi)
        (after equal keys where ``right``): a strided sample of _SAMPLE keys narrows each answer
        to a window between two samples, until a window is read whole."""
        values = np.asarray(values, dtype=keys.dtype)[:, None]
        right = np.asarray(right, dtype=bool)[:, None]
        if values.size == 0:
            return np.zeros(0, dtype=np.int64)
        rows = np.arange(values.shape[0])
        a = np.full(values.shape[0], lo, dtype=np.int64)  # each answer lies in [a, b]
        b = np.full(values.shape[0], hi, dtype=np.int64)
        while True:
            width = int((b - a).max())
            stride = max(1, -(-width // _SAMPLE))
            pos = a[:, None] + np.arange(0, width, stride)
            inside = pos < b[:, None]
            k = keys[self.sa[np.minimum(pos, hi - 1)] + offset]
            before = np.where(right, k <= values, k < values) & inside
            count = before.sum(axis=1)
            if stride == 1:
                return a + count
            # The answer is after the last sample before it and at or before the first one not.
            a = np.where(count > 0, pos[rows, np.maximum(count - 1, 0)] + 1, a)
            b = np.where(count < inside.sum(axis=1), pos[rows, np.minimum(count, pos.shape[1] - 1)], b)

    # -- file -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, meta: dict) -> Path:
        """Write tokens, suffix array and ``meta`` (JSON in the safetensors header), atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        if path.is_dir():
            raise SpecHeadsError(f"suffix index output {path} is a directory: name a file, e.g. {path / 'corpus.safetensors'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {**meta, "format": FORMAT, "version": FORMAT_VERSION, "sort_depth": self.sort_depth,
                  "num_tokens": self.num_tokens, "num_sequences": int(np.count_nonzero(self.tokens == SEP))}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            save_file({"tokens": self.tokens, "suffix_array": self.sa}, tmp, metadata={"specheads": json.dumps(header)})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.meta = header
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verifier=None) -> "SuffixArray":
        """Read an index file; with ``verifier``, refuse one built for another verifier or tokenizer."""
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise SpecHeadsError(f"suffix index not found: {path} (build one with `specheads suffix-index --data SOURCE --output {path}`)")
        try:
            with safe_open(str(path), framework="np") as f:
                raw = (f.metadata() or {}).get("specheads")
        except Exception as exc:  # safetensors raises its own types for a truncated or foreign file
            raise SpecHeadsError(f"suffix index {path} is corrupt or not a safetensors file: {exc}") from exc
        try:
            meta = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError as exc:
            raise SpecHeadsError(f"suffix index {path} has a corrupt 'specheads' header: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SpecHeadsError(f"{path} is not a specheads suffix index (no '{FORMAT}' header in its safetensors metadata)")
        if meta.get("version") != FORMAT_VERSION:
            raise SpecHeadsError(f"suffix index {path} has format version {meta.get('version')!r}; this specheads reads {FORMAT_VERSION}")
        if verifier is not None:
            check_index_verifier(meta.get("verifier"), verifier, path)
        try:
            arrays = load_file(str(path))
        except Exception as exc:
            raise SpecHeadsError(f"suffix index {path} is corrupt or truncated: {exc}") from exc
        tokens, sa = arrays.get("tokens"), arrays.get("suffix_array")
        depth = meta.get("sort_depth")
        problem = _check_arrays(tokens, sa, depth, verifier)
        if problem:
            raise SpecHeadsError(f"suffix index {path} is corrupt: {problem}")
        index = cls(tokens.astype(np.int32, copy=False), sa, depth, meta)
        index.path = str(path)
        if bool((index._packed_sa[1:] < index._packed_sa[:-1]).any()):  # a full check would cost a rebuild
            raise SpecHeadsError(f"suffix index {path} is corrupt: its suffix array is not sorted")
        return index


def _check_arrays(tokens, sa, depth, verifier) -> str | None:
    if tokens is None or sa is None:
        return "it lacks the 'tokens' or 'suffix_array' tensor"
    if tokens.ndim != 1 or sa.ndim != 1 or tokens.shape != sa.shape:
        return f"'tokens' {tokens.shape} and 'suffix_array' {sa.shape} must be equal 1-D shapes"
    if tokens.dtype != np.int32 or sa.dtype not in (np.int32, np.int64):
        return f"dtypes {tokens.dtype} / {sa.dtype}, expected int32 / int32 or int64"
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        return f"its header's sort_depth {depth!r} is not a positive integer"
    if tokens.size == 0:
        return None
    if tokens[-1] != SEP or int(tokens.min()) < SEP:
        return "its token array is not a list of sequences each ended by -1"
    if verifier is not None and int(tokens.max()) >= verifier.vocab_size:
        return f"token id {int(tokens.max())} is outside the verifier's vocabulary of {verifier.vocab_size}"
    if int(sa.min()) < 0 or int(sa.max()) >= sa.size or np.bincount(sa, minlength=sa.size).max() != 1:
        return "its suffix array is not a permutation of the token positions"
    return None


# ----------------------------------------------------------------------------- construction


def _packing(max_rank: int, sort_depth: int) -> tuple[int, int]:
    """Bits per rank and how many ranks one uint64 key holds (at most sort_depth)."""
    bits = max(1, int(max_rank).bit_length())
    return bits, max(1, min(64 // bits, sort_depth))


def _pack(rank: np.ndarray, bits: int, width: int) -> np.ndarray:
    """key[i] = ranks i .. i + width - 1 packed big-endian into a uint64 (past the end: 0)."""
    n = rank.size
    padded = np.concatenate([rank, np.zeros(width, dtype=rank.dtype)]).astype(np.uint64)
    key = np.zeros(n, dtype=np.uint64)
    for j in range(width):
        key = (key << np.uint64(bits)) | padded[j : j + n]
    return key


def _pack_one(chunk: np.ndarray, fill: int, bits: int, width: int) -> np.uint64:
    value = 0
    for j in range(width):
        value = (value << bits) | (int(chunk[j]) if j < chunk.size else fill)
    return np.uint64(value)


def _dense_rank(key: np.ndarray, order: np.ndarray) -> np.ndarray:
    """rank[i] in 1.. of key[i] among all keys (equal keys, equal ranks)."""
    ordered = key[order]
    step = np.empty(ordered.size, dtype=np.int64)
    step[0] = 1
    np.not_equal(ordered[1:], ordered[:-1], out=step[1:])
    rank = np.empty(ordered.size, dtype=np.int64)
    rank[order] = np.cumsum(step)
    return rank


def suffix_array(tokens: np.ndarray, sort_depth: int) -> np.ndarray:
    """Start positions sorted by their first ``sort_depth`` tokens (SEP first), ties by position.

    Prefix doubling: sort by packed keys of the first few tokens, then repeatedly by the pair
    (rank of the first h tokens, rank of the h tokens after them), which sorts by 2h tokens;
    stops at sort_depth or when every suffix has its own rank."""
    n = tokens.size
    index_dtype = np.int32 if n < 2**31 else np.int64
    if n == 0:
        return np.zeros(0, dtype=index_dtype)
    rank0 = tokens.astype(np.int64) + 1
    bits, width = _packing(int(rank0.max()), sort_depth)
    key = _pack(rank0, bits, width)
    order = np.argsort(key, kind="stable")
    rank = _dense_rank(key, order)
    h = width
    while h < sort_depth and rank[order[-1]] < n:
        nxt = np.zeros(n, dtype=np.int64)
        nxt[: n - h] = rank[h:] if h < n else nxt[:0]
        key = rank * (n + 1) + nxt
        order = np.argsort(key, kind="stable")
        rank = _dense_rank(key, order)
        h *= 2
    return order.astype(index_dtype)


def _min_count(fraction: float, known: int) -> int:
    return max(1, int(np.ceil(fraction * known - 1e-9)))


# ----------------------------------------------------------------------------- growing buffer


class TokenBuffer:
    """A growing token sequence searched by scanning. States are arrays of the positions right
    after each occurrence (where its next token is, or the buffer's end)."""

    def __init__(self, capacity: int = 1024):
        self._ranks = np.zeros(max(16, capacity), dtype=np.int64)  # token + 1; 0 = SEP or not yet written
        self.size = 0

    def extend(self, tokens: Sequence[int]) -> None:
        new = np.asarray(tokens, dtype=np.int64).reshape(-1) + 1
        end = self.size + new.size
        if end + 1 > self._ranks.size:  # keep one 0 past the end: reading there means "ended"
            grown = np.zeros(max(2 * self._ranks.size, end + 1), dtype=np.int64)
            grown[: self.size] = self._ranks[: self.size]
            self._ranks = grown
        self._ranks[self.size : end] = new
        self.size = end

    def end_sequence(self) -> None:
        self.extend([SEP])

    def clear(self) -> None:
        self._ranks[: self.size] = 0
        self.size = 0

    def ranks(self) -> np.ndarray:
        return self._ranks[: self.size]

    def tokens(self) -> np.ndarray:
        return self._ranks[: self.size] - 1

    def longest_suffix(self, context: np.ndarray, max_len: int):
        r, n = self._ranks, self.size
        limit = min(max_len, context.size)
        if n < 2 or limit <= 0:
            return 0, None
        # End positions of the occurrences of the last token that a token follows, then of the
        # last two tokens, ... (the context's own suffix, at the buffer's end, has no follower).
        ends = np.nonzero((r[: n - 1] == context[-1]) & (r[1:n] != 0))[0]
        if ends.size == 0:
            return 0, None
        length = 1
        while length < limit:
            longer = ends[ends >= length]
            longer = longer[r[longer - length] == context[-1 - length]]
            if longer.size == 0:
                break
            ends, length = longer, length + 1
        return length, ends + 1

    def expand(self, state, fraction: float):
        nxt = self._ranks[state]
        keep = nxt != 0
        follows, keys = state[keep], nxt[keep]
        if keys.size == 0:
            return 0, []
        need = _min_count(fraction, keys.size)
        counts: dict[int, int] = {}
        for k in keys.tolist():  # a handful of occurrences, as a rule: cheaper than np.unique
            counts[k] = counts.get(k, 0) + 1
        out = [(k - 1, c, follows[keys == k] + 1) for k, c in counts.items() if c >= need]
        out.sort(key=lambda c: (-c[1], c[0]))
        return int(keys.size), out

    def child(self, state, token: int):
        hit = state[self._ranks[state] == token + 1]
        return int(hit.size), (hit + 1 if hit.size else None)


# ----------------------------------------------------------------------------- verifier check


def index_verifier_info(verifier) -> dict:
    """What an index records of the verifier it was built for: name, fingerprint, weights hash
    (checkpoint.verifier_info) and tokenizer (vocabulary size, chat template hash)."""
    from ..checkpoint import verifier_info
    from ..training.data import _tokenizer_info

    return {**verifier_info(verifier), "tokenizer": _tokenizer_info(verifier)}


_CHECKED = ("vocab_size", "hidden_size", "lm_head_sha256", "weights_sha256", "tokenizer")


def check_index_verifier(recorded, verifier, path) -> None:
    """One error naming both verifiers when the index was built for another model or tokenizer."""
    if not isinstance(recorded, dict) or not all(k in recorded for k in _CHECKED[:3]):
        raise SpecHeadsError(f"suffix index {path} does not record the verifier it was built for (got {recorded!r}), "
                             f"so it cannot be checked against '{verifier.name}': rebuild it with `specheads suffix-index`")
    actual = index_verifier_info(verifier)
    differ = [k for k in _CHECKED if k in recorded and recorded[k] != actual[k]]
    if differ:
        def said(info):
            return ", ".join(f"{k} {info.get(k)}" for k in differ)

        raise SpecHeadsError(
            f"suffix index {path} was built for verifier '{recorded.get('name', '?')}' ({said(recorded)}), "
            f"not for '{verifier.name}' ({said(actual)}): its token ids would not mean the same text; "
            f"build an index for this verifier with `specheads suffix-index --verifier {verifier.name} ...`"
        )


# ----------------------------------------------------------------------------- offline corpus


def build_corpus_index(source, verifier, output, *, limit: int | None = None, prompt_tokens: int = 16,
                       sort_depth: int = DEFAULT_SORT_DEPTH) -> SuffixArray:
    """Index the conversations of ``source`` (anything ``load_conversations`` reads, e.g. a
    self-distilled folder or ``sharegpt``) tokenised for ``verifier``, and save it to ``output``.

    Each conversation contributes its answer tokens preceded by the last ``prompt_tokens`` tokens
    of its prompt (the chat template's assistant header, so an answer's first tokens can be
    matched); ``prompt_tokens`` < 0 keeps the whole prompt."""
    from ..training.data import load_conversations

    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int):
        raise SpecHeadsError(f"prompt_tokens must be an integer, got {prompt_tokens!r}")
    if Path(output).is_dir():  # before the data is read, not after
        raise SpecHeadsError(f"suffix index output {output} is a directory: name a file, e.g. {Path(output) / 'corpus.safetensors'}")
    data = load_conversations(source, verifier, limit=limit)
    sequences = [ids[max(0, plen - prompt_tokens) if prompt_tokens >= 0 else 0:]
                 for ids, plen in zip(data["input_ids"], data["prompt_length"])]
    index = SuffixArray.build(sequences, sort_depth=sort_depth)
    index.save(output, {"verifier": index_verifier_info(verifier), "source": str(source),
                        "num_conversations": len(sequences), "prompt_tokens": prompt_tokens})
    index.path = str(output)
    return index
