"""Medusa heads (Cai et al. 2024): K small heads on the verifier's last hidden state.

Head k (0-based) predicts the token k+1 places after the verifier's next token. Each head is
``num_layers`` residual blocks ``x + SiLU(W x)`` (W zero-initialised, so a fresh head starts as
the identity) followed by an LM head: its own (initialised from the verifier's) or the
verifier's, shared and frozen. An optional truncated draft vocabulary keeps only the N most
frequent tokens of the training data; ``token_map[i]`` is the verifier id of draft id i. A shared
head over a truncated vocabulary uses the verifier's rows of those tokens: the one truncated form
vLLM 0.32 can serve (it builds own heads over the full vocabulary only).

Tensor names follow vLLM's Medusa loader (``blocks.{h}.layers.{l}.weight``, ``lm_heads.{h}.weight``,
``token_map``) so exporting is a config rewrite, not a re-layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..checkpoint import load_drafter_state, save_drafter, verifier_info
from ..decoding.candidates import Candidates, DraftContext
from ..errors import SpecHeadsError

KIND = "medusa"

# Static trees as paths of top-k ranks per depth (Medusa's "choices"): (0,) is head 0's top-1,
# (1,) its second choice, (0, 0) head 1's top-1 after head 0's top-1, and so on. Default tree
# sizes come from `specheads bench --tree` sweeps on the target hardware; on a 2-core CPU a
# verify forward grows fast with its token count, so the small trees win there.
TREES: dict[str, list[tuple[int, ...]]] = {
    "chain": [],  # filled per number of heads: (0,), (0, 0), ...
    # Small trees for CPUs, where a verify forward of 5-7 tokens still costs little more than 2-3
    # (with streamed linears): the chain plus the runner-up choices of the first two heads.
    "tree4": [(0,), (1,), (0, 0), (0, 0, 0)],
    "tree6": [(0,), (1,), (0, 0), (1, 0), (0, 0, 0), (0, 0, 0, 0)],
    "tree8": [(0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0), (2,)],
    "tree16": [
        (0,), (1,), (2,), (0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (0, 0, 0), (1, 0, 0),
        (0, 1, 0), (0, 0, 1), (0, 0, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0, 0), (3,),
    ],
}


@dataclass
class MedusaConfig:
    hidden_size: int
    vocab_size: int  # the verifier's vocabulary
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = False
    draft_vocab_size: int | None = None  # None = the full vocabulary
    bias: bool = True

    def __post_init__(self):
        if self.num_heads < 1:
            raise SpecHeadsError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.num_layers < 0:
            raise SpecHeadsError(f"num_layers must be >= 0, got {self.num_layers}")
        if self.draft_vocab_size is not None:
            if not 1 <= self.draft_vocab_size <= self.vocab_size:
                raise SpecHeadsError(f"draft_vocab_size must be in [1, {self.vocab_size}], got {self.draft_vocab_size}")


class ResBlock(nn.Linear):
    """x + SiLU(W x); a Linear subclass so its tensors are named as vLLM expects."""

    def __init__(self, hidden: int, bias: bool):
        super().__init__(hidden, hidden, bias=bias)
        nn.init.zeros_(self.weight)  # a fresh block is the identity
        if bias:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return x + nn.functional.silu(super().forward(x))


class MedusaHeads(nn.Module):
    def __init__(self, config: MedusaConfig, token_map: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"layers": nn.ModuleList(ResBlock(H, config.bias) for _ in range(config.num_layers))})
            for _ in range(config.num_heads)
        )
        out = config.draft_vocab_size or config.vocab_size
        self.lm_heads = None if config.shared_lm_head else nn.ModuleList(nn.Linear(H, out, bias=False) for _ in range(config.num_heads))
        if config.draft_vocab_size is not None:
            if token_map is None or token_map.numel() != config.draft_vocab_size:
                raise SpecHeadsError(f"a truncated draft vocabulary of {config.draft_vocab_size} needs a token_map of that length")
            self.register_buffer("token_map", token_map.long().clone())
        else:
            self.token_map = None
        # [head][rank] held-out accuracy from training, when the checkpoint records it (autoN trees).
        self.rank_accuracy: list[list[float]] | None = None

    def init_lm_heads_from(self, lm_head_weight: torch.Tensor) -> None:
        """Copy the verifier's LM head (rows of the draft vocabulary) into every own head."""
        if self.lm_heads is None:
            return
        rows = lm_head_weight if self.token_map is None else lm_head_weight[self.token_map.to(lm_head_weight.device)]
        with torch.no_grad():
            for head in self.lm_heads:
                head.weight.copy_(rows)

    def features(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            x = hidden
            for layer in block["layers"]:
                x = layer(x)
            outs.append(x)
        return outs

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] -> logits [num_heads, ..., V_draft]."""
        feats = self.features(hidden)
        if self.lm_heads is None:
            if lm_head_weight is None:
                raise ValueError("shared_lm_head heads need the verifier's lm_head weight")
            rows = self.shared_rows(lm_head_weight)
            return torch.stack([nn.functional.linear(f, rows) for f in feats])
        return torch.stack([head(f) for head, f in zip(self.lm_heads, feats)])

    def shared_rows(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """The verifier's LM-head rows this shared head scores: all, or the draft vocabulary's.
        Callers that score often pass the rows already cut (a [draft_vocab, H] weight)."""
        if self.token_map is None or lm_head_weight.shape[0] == self.token_map.numel():
            return lm_head_weight
        return lm_head_weight[self.token_map.to(lm_head_weight.device)]

    def to_verifier_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.token_map is None else self.token_map[draft_ids]


def rank_accuracy(eval_metrics: dict | None, num_heads: int) -> list[list[float]] | None:
    """[head][rank] held-out accuracy from a training run's final evaluation, or None if absent.

    Where the evaluation holds them, head k's rates are conditional on every earlier head having
    had its token among its top ranks (``eval/cond_rank{r}_head{k}``): the heads read one hidden
    state, so a deep node is accepted far more often than the product of unconditional rates says.
    Older drafters recorded only the unconditional rates (``eval/top1_head{k}``, ``eval/rank{r}_head{k}``)."""
    if not eval_metrics:
        return None
    if f"eval/cond_rank0_head{num_heads - 1}" in eval_metrics:
        return [_series(eval_metrics, f"eval/cond_rank{{}}_head{k}") for k in range(num_heads)]
    if f"eval/top1_head{num_heads - 1}" not in eval_metrics:
        return None
    return [[eval_metrics[f"eval/top1_head{k}"]] + _series(eval_metrics, f"eval/rank{{}}_head{k}", start=1) for k in range(num_heads)]


def _series(metrics: dict, pattern: str, start: int = 0) -> list[float]:
    """metrics[pattern.format(start)], metrics[pattern.format(start + 1)], ... while present."""
    values, r = [], start
    while pattern.format(r) in metrics:
        values.append(metrics[pattern.format(r)])
        r += 1
    return values


def best_tree(accuracy: list[list[float]], size: int) -> list[tuple[int, ...]]:
    """The ``size``-node tree with the highest expected accepted length, as Medusa builds it.

    A node (path of ranks) is accepted with probability prod_d accuracy[d][path[d]] (depth d's rate
    given that the path reached it, see ``rank_accuracy``), and the expected accepted length is the sum of that over the nodes. A
    child's probability is at most its parent's, so taking the ``size`` most probable paths,
    grown greedily from the root's children, gives a valid tree and the optimum under that model.
    """
    chosen: list[tuple[int, ...]] = []
    prob = {(): 1.0}
    frontier = {(r,): accuracy[0][r] for r in range(len(accuracy[0]))}
    while frontier and len(chosen) < size:
        path = max(frontier, key=lambda p: (frontier[p], -len(p)))
        prob[path] = frontier.pop(path)
        chosen.append(path)
        depth = len(path)
        if depth < len(accuracy):
            for r in range(len(accuracy[depth])):
                frontier[path + (r,)] = prob[path] * accuracy[depth][r]
    return chosen


# "auto": a tree for goodput control to cut each step (the engine's default keeps only the nodes
# worth their verify cost on this machine), so it can be generous: the best 16-node tree for the
# heads' recorded accuracy, or the 16-node preset for heads trained before specheads recorded it.
AUTO_TREE = ("auto16", "tree16")


def device_tree(device_type: str, has_accuracy: bool) -> str:
    """What ``--tree auto`` means for these heads (the same on every device: goodput control sizes it)."""
    data_driven, preset = AUTO_TREE
    return data_driven if has_accuracy else preset


def tree_paths(name_or_paths, num_heads: int, accuracy: list[list[float]] | None = None) -> list[tuple[int, ...]]:
    """A tree preset name, ``autoN`` (the best N-node tree for the heads' measured accuracy), or
    explicit paths -> validated paths, parents before children."""
    if isinstance(name_or_paths, str) and name_or_paths.startswith("auto"):
        size = name_or_paths[4:]
        if not size.isdigit() or int(size) < 1:
            raise SpecHeadsError(f"tree '{name_or_paths}': autoN needs a node count N >= 1, e.g. auto6")
        if accuracy is None:
            raise SpecHeadsError(
                f"tree '{name_or_paths}' is built from the heads' held-out accuracy per rank, which this drafter's "
                "config.json does not hold (trained before specheads recorded it): use chain, tree4, tree6, tree8 or tree16"
            )
        name_or_paths = best_tree(accuracy, int(size))
    if isinstance(name_or_paths, str):
        if name_or_paths not in TREES:
            raise SpecHeadsError(f"unknown Medusa tree '{name_or_paths}' (known: {', '.join(TREES)}, autoN)")
        if name_or_paths == "chain":
            paths = [tuple([0] * d) for d in range(1, num_heads + 1)]
        else:  # a preset deeper than the heads is cut to their depth
            paths = [p for p in TREES[name_or_paths] if len(p) <= num_heads]
    else:
        paths = [tuple(p) for p in name_or_paths]
    paths = sorted(set(paths), key=lambda p: (len(p), p))
    for p in paths:
        if len(p) > num_heads:
            raise SpecHeadsError(f"tree path {p} is deeper than the {num_heads} Medusa heads")
        if len(p) > 1 and p[:-1] not in paths:
            raise SpecHeadsError(f"tree path {p} has no parent path {p[:-1]} in the tree")
    return [p for p in paths if len(p) <= num_heads]


class MedusaDrafter:
    """Proposes from Medusa heads: the top-1 chain, or a static tree of top-k choices."""

    name = KIND
    needs_hidden_states = True
    hidden_layers = (-1,)  # the verifier's last hidden state only

    def __init__(self, heads: MedusaHeads, verifier, tree: str | list = "chain"):
        self.heads = heads.eval().to(verifier.device, verifier.dtype)
        self.heads.requires_grad_(False)
        # A shared head over a truncated vocabulary: cut the verifier's rows once, not per step.
        self.lm_head_weight = self.heads.shared_rows(verifier.model.get_output_embeddings().weight) if self.heads.lm_heads is None else None
        if tree == "auto":
            tree = device_tree(torch.device(verifier.device).type, heads.rank_accuracy is not None)
        self.tree = tree
        self.paths = tree_paths(tree, heads.config.num_heads, heads.rank_accuracy)
        self.max_rank = max((max(p) for p in self.paths), default=0) + 1
        # Read by the engine at setup: trees need a verifier that can verify them (no chunked or linear attention).
        self.proposes_trees = self.max_rank > 1

    @property
    def detail(self) -> str:
        name = self.tree if isinstance(self.tree, str) else "custom"
        return f"tree {name}, {len(self.paths)} nodes"

    def start(self, prompt_ids: list[int]) -> None:
        pass

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Candidates:
        if ctx.hidden_states is None:
            raise RuntimeError("MedusaDrafter needs the verifier's hidden states")
        h = ctx.hidden_states[-1][-1]  # last layer, the row that predicted the pending token
        logits = self.heads(h, self.lm_head_weight)  # [K, V]
        # A chain shorter than the heads when the engine asks for fewer tokens.
        depth = min(ctx.num_draft_tokens, self.heads.config.num_heads)
        paths = [p for p in self.paths if len(p) <= depth]
        top = torch.softmax(logits[:depth].float(), -1).topk(self.max_rank, dim=-1)  # [depth, R]
        ranked = self.heads.to_verifier_ids(top.indices).tolist()
        probs = top.values.tolist()
        index = {p: i for i, p in enumerate(paths)}
        tokens = [ranked[len(p) - 1][p[-1]] for p in paths]
        parents = [index[p[:-1]] if len(p) > 1 else -1 for p in paths]
        # A head's probability is its confidence in the token whatever the path above it.
        scores = [probs[len(p) - 1][p[-1]] for p in paths]
        return Candidates(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), scores=torch.tensor(scores))

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        pass


def vllm_medusa_keys(cfg: MedusaConfig) -> dict:
    """The shape keys vLLM's Medusa config reads (the export adds the bias and LM-head flags)."""
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
    }


def save_medusa(path, heads: MedusaHeads, verifier, training: dict | None = None):
    cfg = heads.config
    state = {k: v for k, v in heads.state_dict().items()}
    extra = vllm_medusa_keys(cfg)  # so the folder is close to servable as is
    hp = asdict(cfg)
    if training:
        hp["training"] = training
    return save_drafter(path, KIND, state, hp, verifier_info(verifier), extra)


def load_medusa_heads(path, verifier=None) -> MedusaHeads:
    config, tensors = load_drafter_state(path, verifier, expected_kind=KIND)
    hp = config["specheads"].get("hyper_parameters")
    if not isinstance(hp, dict):
        raise SpecHeadsError(f"Medusa checkpoint {path}: 'specheads.hyper_parameters' must be an object, got {hp!r}")
    training = hp.get("training") or {}
    hp = {k: v for k, v in hp.items() if k != "training"}
    fields = {f.name: f for f in dataclasses.fields(MedusaConfig)}
    unknown = sorted(set(hp) - set(fields))
    missing = sorted(n for n, f in fields.items() if n not in hp and f.default is dataclasses.MISSING)
    if unknown or missing:
        raise SpecHeadsError(
            f"Medusa checkpoint {path}: hyper_parameters " + "; ".join(
                ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else []))
            + f" (known: {', '.join(fields)})"
        )
    for name, value in hp.items():  # the JSON types MedusaConfig expects, before it compares them
        kind = bool if fields[name].type in ("bool", bool) else int
        if value is None and name == "draft_vocab_size":
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SpecHeadsError(f"Medusa checkpoint {path}: hyper_parameters.{name} must be {'true or false' if kind is bool else 'an integer'}, got {value!r}")
    for key in ("hidden_size", "vocab_size") if verifier is not None else ():
        if hp[key] != getattr(verifier, key):
            raise SpecHeadsError(f"Medusa checkpoint {path}: hyper_parameters.{key}={hp[key]}, but verifier "
                                 f"'{verifier.name}' has {key}={getattr(verifier, key)}")
    heads = MedusaHeads(MedusaConfig(**hp), token_map=tensors.get("token_map"))
    expected = heads.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config says {tuple(expected[k].shape)})" for k, v in tensors.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise SpecHeadsError(f"Medusa checkpoint {path}: tensor shapes do not match its hyper_parameters: {', '.join(wrong[:3])}")
    missing, unexpected = heads.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise SpecHeadsError(f"Medusa checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}")
    heads.rank_accuracy = rank_accuracy(training.get("eval") if isinstance(training, dict) else None, heads.config.num_heads)
    return heads


def load_medusa_drafter(path, verifier, *, tree: str | list = "chain", draft_vocab: int = 0, **_) -> MedusaDrafter:
    if draft_vocab:
        raise SpecHeadsError(f"--draft-vocab {draft_vocab} is for draft models; Medusa heads fix their vocabulary when "
                             "they are trained (drafter.draft_vocab_size in the recipe)")
    return MedusaDrafter(load_medusa_heads(path, verifier), verifier, tree=tree)
