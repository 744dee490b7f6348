"""EAGLE-3 (Li et al. 2025): a one-layer drafter that reads the verifier's own features.

The verifier's hidden states at three depths (low, middle, high; ``aux_layer_ids`` index
transformers' ``hidden_states``, so id i is the input to decoder layer i, which is what vLLM's
``eagle3`` captures) are concatenated and mapped back to the hidden size by ``fc``. A drafter row
pairs the feature of position t with the token at t + 1 (the one the verifier chose there), and
predicts the token at t + 2. The decoder layer's attention reads
``cat(input_layernorm(embed(token)), hidden_norm(feature))`` (2H wide); its residual stream is
the un-normed feature. To draft further, a row's own output (before the final norm) stands in
for the feature it has not got: that is what training-time test teaches the layer to use.

The token embedding is the verifier's, frozen and never saved; the LM head scores a draft
vocabulary (``d2t[i]`` = target id - draft id, as vLLM reads it). Tensors are named as vLLM's
loader expects (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``), so export is a config
rewrite. The layer is this module's own small code built from transformers' public Llama parts
(RMSNorm, MLP, rotary embedding with the verifier's rope settings): it serves any verifier family
transformers loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_drafter_state, save_drafter, verifier_info
from ..decoding.candidates import Candidates, DraftContext
from ..decoding.sampling import draw
from ..errors import SpecHeadsError

KIND = "eagle3"


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's default, the inputs to layers 2, N // 2 and N - 3. In shallow verifiers they are kept
    within 1..N-1 (id N, the last hidden state, is normed in transformers but not in vLLM) and
    repeats are dropped (vLLM captures a layer once)."""
    top = max(1, num_layers - 1)
    return sorted({min(max(i, 1), top) for i in (2, num_layers // 2, num_layers - 3)})


def verifier_depth(verifier) -> int:
    cfg = verifier.config.get_text_config() if hasattr(verifier.config, "get_text_config") else verifier.config
    return _first_attr(cfg, "num_hidden_layers", "n_layer")


@dataclass
class Eagle3Config:
    hidden_size: int  # the verifier's (the drafter works in the verifier's hidden space)
    vocab_size: int  # the verifier's
    draft_vocab_size: int
    aux_layer_ids: list[int]
    num_verifier_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 8192
    num_layers: int = 1

    def __post_init__(self):
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise SpecHeadsError(f"draft_vocab_size={self.draft_vocab_size} must be in [1, {self.vocab_size}] (the verifier's vocabulary)")
        if len(self.aux_layer_ids) < 1:
            raise SpecHeadsError("aux_layer_ids needs at least one verifier layer")
        bad = [i for i in self.aux_layer_ids if not isinstance(i, int) or not 1 <= i <= self.num_verifier_layers]
        if bad:
            raise SpecHeadsError(
                f"aux_layer_ids {bad} are outside the verifier's depth: ids count hidden states 1..{self.num_verifier_layers} "
                f"(id i = the input to layer i; the verifier has {self.num_verifier_layers} layers)"
            )
        if self.num_layers < 1:
            raise SpecHeadsError(f"num_layers={self.num_layers} must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SpecHeadsError(f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_verifier(cls, verifier, draft_vocab_size: int, aux_layer_ids: list[int] | None = None, num_layers: int = 1) -> "Eagle3Config":
        """Attention shape, MLP width and rope settings follow the verifier's text config."""
        cfg = verifier.config.get_text_config() if hasattr(verifier.config, "get_text_config") else verifier.config
        n_layers = verifier_depth(verifier)
        H = verifier.hidden_size
        heads = _first_attr(cfg, "num_attention_heads", "n_head")
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or H // heads
        inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * H
        eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_epsilon", None) or 1e-5
        return cls(
            hidden_size=H, vocab_size=verifier.vocab_size, draft_vocab_size=draft_vocab_size,
            aux_layer_ids=list(aux_layer_ids) if aux_layer_ids else default_aux_layers(n_layers),
            num_verifier_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            intermediate_size=inter, rms_norm_eps=float(eps), rope_parameters=_rope_parameters(cfg),
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 8192),
            num_layers=num_layers,
        )

    def llama_config(self):
        """The Llama config the layer is built from (and that vLLM reads from the export)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, num_hidden_layers=self.num_layers, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, vocab_size=self.vocab_size,
            rope_parameters=dict(self.rope_parameters), hidden_act="silu", attention_bias=False, mlp_bias=False,
            tie_word_embeddings=False,
        )


def _first_attr(cfg, *names):
    for n in names:
        if getattr(cfg, n, None) is not None:
            return int(getattr(cfg, n))
    raise SpecHeadsError(f"verifier config {type(cfg).__name__} has none of {names}")


def _rope_parameters(cfg) -> dict:
    """The verifier's rope settings (its full-attention ones where layer types differ, e.g.
    Gemma-3); models without rotary embeddings (GPT-2) get Llama's default."""
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        rope = rope["full_attention"]
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        theta = getattr(cfg, "rope_theta", None) or 10000.0
        return {"rope_type": "default", "rope_theta": float(theta)}
    return {k: v for k, v in rope.items() if v is not None}


# ------------------------------------------------------------------------------------ the layer


class Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config, in_dim: int):
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(in_dim, h * d, bias=False)
        self.k_proj = nn.Linear(in_dim, kv * d, bias=False)
        self.v_proj = nn.Linear(in_dim, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, in] -> rotated q [B, h, T, d], k and v [B, kv, T, d]."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.heads // self.kv_heads, dim=1) if self.heads != self.kv_heads else t


class DecoderLayer(nn.Module):
    """Llama's decoder layer, except that the first one reads [norm(embedding), norm(feature)]."""

    def __init__(self, cfg: Eagle3Config, llama_cfg, first: bool):
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        super().__init__()
        H = cfg.hidden_size
        self.first = first
        self.self_attn = Attention(cfg, 2 * H if first else H)
        self.mlp = LlamaMLP(llama_cfg)
        self.input_layernorm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        if first:
            self.hidden_norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)

    def forward(self, embeds, hidden, cos, sin, attend):
        """``attend(q, k, v) -> [B, h, T, d]`` does the attention proper (with a cache, a mask or
        training-time test's extra keys), so one layer serves training and drafting."""
        residual = hidden
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], -1) if self.first else self.input_layernorm(hidden)
        q, k, v = self.self_attn.qkv(x, cos, sin)
        h = residual + self.self_attn.out(attend(q, k, v))
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Model(nn.Module):
    def __init__(self, cfg: Eagle3Config, d2t: torch.Tensor | None = None):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        self.config = cfg
        llama_cfg = cfg.llama_config()
        H = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * H, H, bias=False)
        self.midlayer = DecoderLayer(cfg, llama_cfg, first=True)
        # Further layers (num_layers > 1) are plain Llama layers over the hidden size.
        self.layers = nn.ModuleList(DecoderLayer(cfg, llama_cfg, first=False) for _ in range(cfg.num_layers - 1))
        self.norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(llama_cfg)
        if d2t is None:
            if cfg.draft_vocab_size != cfg.vocab_size:
                raise SpecHeadsError(f"a draft vocabulary of {cfg.draft_vocab_size} < {cfg.vocab_size} tokens needs its d2t map")
            d2t = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
        if d2t.numel() != cfg.draft_vocab_size:
            raise SpecHeadsError(f"d2t has {d2t.numel()} entries for a draft vocabulary of {cfg.draft_vocab_size}")
        self.register_buffer("d2t", d2t.long().clone())
        ids = self.draft_to_target()
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size or ids.unique().numel() != ids.numel():
            raise SpecHeadsError(f"d2t maps draft ids outside the verifier's vocabulary of {cfg.vocab_size} or onto repeated ids")
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        self.register_buffer("t2d", t2d)

    @property
    def layer_stack(self) -> list[DecoderLayer]:
        return [self.midlayer, *self.layers]

    def draft_to_target(self) -> torch.Tensor:
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """[..., n_aux * H] verifier features -> [..., H]."""
        return self.fc(aux)

    def rope(self, x: torch.Tensor, positions: torch.Tensor):
        return self.rotary(x, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [..., H] -> draft-vocabulary logits [..., V_draft]."""
        return self.lm_head(self.norm(hidden))

    def ttt_forward(self, aux: torch.Tensor, input_ids: torch.Tensor, embed, steps: int) -> list[torch.Tensor]:
        """Training-time test: ``steps`` draft steps unrolled over whole sequences.

        aux [B, T, n_aux * H]: the verifier's features at each position t; input_ids [B, T].
        Step i at index t reads the token x_{t+1+i} and, for i > 0, its own step-(i-1) output at
        t, sits at position t + i, and predicts x_{t+2+i}. Its query sees step 0's keys causally
        (the real rows up to t) and the keys of steps 1..i at t only: exactly the rows a draft at
        depth i sees when drafting from the real row t. Returns the pre-norm outputs [B, T, H] of
        every step; entries past each sequence's end are padding for the caller to mask.
        """
        B, T, _ = aux.shape
        hidden = self.fuse(aux)
        keys: list[list[torch.Tensor]] = [[] for _ in self.layer_stack]
        values: list[list[torch.Tensor]] = [[] for _ in self.layer_stack]
        causal = torch.ones(T, T, dtype=torch.bool, device=aux.device).tril()
        outs = []
        for i in range(steps):
            tokens = torch.zeros_like(input_ids)
            if 1 + i < T:
                tokens[:, : T - 1 - i] = input_ids[:, 1 + i :]
            embeds = embed(tokens).to(hidden.dtype)
            positions = (torch.arange(T, device=aux.device) + i)[None].expand(B, T)
            cos, sin = self.rope(hidden, positions)
            x = hidden
            for li, layer in enumerate(self.layer_stack):

                def attend(q, k, v, li=li, att=layer.self_attn):
                    keys[li].append(k)
                    values[li].append(v)
                    return _ttt_attention(q, keys[li], values[li], att, causal)

                x = layer(embeds, x, cos, sin, attend)
            outs.append(x)
            hidden = x
        return outs


def _ttt_attention(q, keys, values, att, causal):
    """Attention of step i = len(keys) - 1: step 0's keys under the causal mask, plus one key per
    later step at the query's own index (a diagonal), in one softmax. O(T^2 + T i), not O(T^2 i)."""
    T = q.shape[2]
    scale = q.shape[-1] ** -0.5
    s0 = (q @ att.expand(keys[0]).transpose(-1, -2)) * scale
    s0 = s0.masked_fill(~causal, float("-inf"))
    diag = [(q * att.expand(k)).sum(-1, keepdim=True) * scale for k in keys[1:]]
    w = torch.softmax(torch.cat([s0, *diag], -1).float(), -1).to(q.dtype)
    out = w[..., :T] @ att.expand(values[0])
    for j, v in enumerate(values[1:]):
        out = out + w[..., T + j : T + j + 1] * att.expand(v)
    return out


# drafter.init_qkv_input: where the verifier layer's H-wide q/k/v columns go in the first layer's
# 2H-wide input cat(norm(embed), norm(feature)), as (embed half, feature half) scales.
QKV_INPUTS = {"feature": (0.0, 1.0), "embed": (1.0, 0.0), "split": (0.5, 0.5)}
# drafter.init_fc: random = as built; last = the identity on the deepest aux feature's block (the
# fused feature is that hidden state); mean = identity / n_aux on every block (their average).
FC_INITS = ("random", "last", "mean")


def init_from_verifier(model: Eagle3Model, verifier, *, layer: int | None = None, qkv_input: str = "feature",
                       fc: str = "random") -> None:
    """Start the LM head at the verifier's rows for the draft vocabulary: the drafter's output
    space is the verifier's last hidden space, so this is a far better start than random.

    ``layer`` (drafter.init_layer): drafter layer i starts as verifier decoder layer ``layer`` + i
    (``layer_init_sources``), the drafter's final norm as the verifier's. The first layer's q/k/v
    read 2H wide; ``qkv_input`` (``QKV_INPUTS``) says which half gets the verifier's columns.
    ``fc`` (``FC_INITS``): with ``last``, ``feature`` and ``layer`` = the deepest aux id, the
    first layer computes exactly that verifier layer on real rows."""
    head = verifier.model.get_output_embeddings().weight.detach().float().cpu()
    with torch.no_grad():
        model.lm_head.weight.copy_(head[model.draft_to_target().cpu()])
        if layer is not None:
            per_layer, final_norm = layer_init_sources(model.config, verifier, layer)
            embed_scale, feature_scale = QKV_INPUTS[qkv_input]
            for target, sources in zip(model.layer_stack, per_layer):
                for name, source in sources.items():
                    param = target.get_parameter(name)
                    source = source.detach().to(param.device, param.dtype)
                    if source.shape != param.shape:  # the first layer's q/k/v: [embed half | feature half]
                        source = torch.cat([source * embed_scale, source * feature_scale], 1)
                    param.copy_(source)
            model.norm.weight.copy_(final_norm.detach())
        if fc != "random":
            ids = model.config.aux_layer_ids
            eye = torch.eye(model.config.hidden_size)
            deepest = ids.index(max(ids))
            blocks = [eye / len(ids) if fc == "mean" else eye * float(j == deepest) for j in range(len(ids))]
            model.fc.weight.copy_(torch.cat(blocks, 1))


def layer_init_sources(cfg: Eagle3Config, verifier, first: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """([per drafter layer i: {its parameter name: the tensor of verifier layer ``first`` + i that
    starts it}], the verifier's final norm weight), checked without copying anything, so that a
    recipe is refused before its data is made: the layers exist, are whole on this process (not
    sharded), and are Llama layers of the drafter's shapes (q/k/v/o, a SiLU gate/up/down MLP, two
    RMSNorms, nothing else: a bias or q/k norm the drafter has no place for is named). The first
    layer's ``hidden_norm`` (over the feature half) starts as the ``input_layernorm`` it stands in
    for; its q/k/v sources are H wide."""
    from ..training.sharded_verifier import decoder_layers, sharded

    key = f"drafter.init_layer={first!r}"
    n = cfg.num_verifier_layers
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= n - cfg.num_layers:
        many = isinstance(first, int) and 0 <= first < n  # the first exists, a later drafter layer's does not
        why = f" (drafter layer i starts from verifier layer init_layer + i, i < drafter.num_layers={cfg.num_layers})" if many else ""
        raise SpecHeadsError(f"{key}: verifier layer {n if many else first!r} does not exist{why}; the verifier has {n} "
                             f"decoder layers, 0..{n - 1}")
    info = sharded(verifier.model)
    if info is not None:
        raise SpecHeadsError(f"{key} copies a verifier layer's weights, which verifier.shard={info.mode} splits across "
                             f"{info.processes} processes: not supported (they are not gathered for it); leave drafter.init_layer "
                             "unset, or load the verifier whole (verifier.shard: none)")
    text_cfg = verifier.config.get_text_config() if hasattr(verifier.config, "get_text_config") else verifier.config
    act = next((getattr(text_cfg, k) for k in ("hidden_act", "hidden_activation", "activation_function") if getattr(text_cfg, k, None)), None)
    if act not in ("silu", "swish"):
        raise SpecHeadsError(f"{key}: the verifier's MLP activation is {act!r}; the drafter's Llama MLP is SiLU")
    try:
        layers = decoder_layers(verifier.model)
        final_norm = verifier.model.get_decoder().norm
    except (SpecHeadsError, AttributeError):
        raise SpecHeadsError(f"{key}: {type(verifier.model).__name__} has no list of decoder layers and final norm to copy from") from None
    with torch.device("meta"):  # the drafter's shapes, in no memory
        llama_cfg = cfg.llama_config()
        targets = [DecoderLayer(cfg, llama_cfg, first=i == 0) for i in range(cfg.num_layers)]
    per_layer = []
    for i, target in enumerate(targets):
        j = first + i
        where = f"{key}: verifier layer {j} ({type(layers[j]).__name__})"
        source = dict(layers[j].named_parameters())
        picked = {}
        for name, param in target.named_parameters():
            src_name = "input_layernorm.weight" if name == "hidden_norm.weight" else name
            want = list(param.shape)
            if i == 0 and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
                want[1] = cfg.hidden_size  # the drafter's is 2H wide: the verifier's fills its halves
            if src_name not in source:
                raise SpecHeadsError(f"{where} has no tensor {src_name} (the drafter's is {want}); it has {', '.join(source)}")
            if list(source[src_name].shape) != want:
                raise SpecHeadsError(f"{where}: its {src_name} is {list(source[src_name].shape)}, the drafter's is {want}")
            picked[name] = source[src_name]
        extra = [name for name in source if all(t is not source[name] for t in picked.values())]
        if extra:
            raise SpecHeadsError(f"{where} has {', '.join(extra)}, which the drafter's Llama layer has no place for")
        for name in ("input_layernorm", "post_attention_layernorm"):
            _check_rms_norm(layers[j].get_submodule(name), cfg.rms_norm_eps, f"{where}: its {name}")
        per_layer.append(picked)
    if list(final_norm.weight.shape) != [cfg.hidden_size]:
        raise SpecHeadsError(f"{key}: the verifier's final norm weight is {list(final_norm.weight.shape)}, the drafter's is [{cfg.hidden_size}]")
    _check_rms_norm(final_norm, cfg.rms_norm_eps, f"{key}: the verifier's final norm")
    return per_layer, final_norm.weight


@torch.no_grad()
def _check_rms_norm(norm, eps: float, what: str) -> None:
    """Refuse a norm that is not Llama's RMSNorm x / rms(x) * weight (Gemma's scales by 1 + weight,
    LayerNorm subtracts the mean): its weight would mean something else in the drafter."""
    w = getattr(norm, "weight", None)
    if w is None:
        raise SpecHeadsError(f"{what} ({type(norm).__name__}) has no weight")
    x = torch.linspace(-2.0, 3.0, 2 * w.numel(), device=w.device).view(2, -1)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    if not torch.allclose(norm(x.to(w.dtype)).float(), expected, rtol=2e-2, atol=1e-3):
        raise SpecHeadsError(f"{what} ({type(norm).__name__}) does not compute Llama's RMSNorm, which the drafter's layer does")


def draft_vocab_d2t(token_ids: torch.Tensor) -> torch.Tensor:
    """The d2t offsets for a draft vocabulary given as verifier ids (sorted ascending, as EAGLE does)."""
    ids = token_ids.long().sort().values
    return ids - torch.arange(ids.numel())


# -------------------------------------------------------------------------- drafting


class Eagle3Drafter:
    """Drafts chains or EAGLE-2 dynamic trees with an EAGLE-3 model and its own KV cache.

    Real rows (a verifier feature and the token the verifier emitted after it) are cached for the
    whole sequence; draft rows appended while proposing are dropped at the next proposal, where
    the rows of the accepted tokens are recomputed from the verifier's true features. The cache is
    preallocated and grown by doubling, and each drafting level is one forward over the frontier,
    so a level costs a few small matmuls, not a copy of the cache.

    ``tree``: ``"chain"``; an int N (or ``"dynN"``): the N best nodes of the dynamic tree; or
    ``"auto"``: every node the tree expands (at most ``MAX_TREE_NODES``, best first), for the
    engine's goodput control to choose from.
    """

    name = KIND
    needs_hidden_states = True
    MAX_TREE_NODES = 64

    def __init__(self, model: Eagle3Model, verifier, *, tree: str | int = "auto", top_k: int = 4):
        self.model = model.eval().to(verifier.device, verifier.dtype)
        self.model.requires_grad_(False)
        self.embed = verifier.model.get_input_embeddings()
        self.hidden_layers = tuple(model.config.aux_layer_ids)
        self.vocab_size = model.config.vocab_size
        self.draft_ids = model.draft_to_target()
        self._draft_ids_list = self.draft_ids.tolist()
        if isinstance(tree, str) and tree not in ("chain", "auto"):
            if not (tree.startswith("dyn") and tree[3:].isdigit()):
                raise SpecHeadsError(f"EAGLE-3 tree '{tree}': use chain, auto or dynN (a dynamic tree of N nodes, N >= 1)")
            tree = int(tree[3:])
        if isinstance(tree, int) and tree < 1:
            raise SpecHeadsError(f"tree budget {tree} must be >= 1 node")
        if top_k < 1:
            raise SpecHeadsError(f"top_k={top_k} must be >= 1")
        self.tree = tree
        self.top_k = top_k
        self.proposes_trees = tree != "chain"  # the engine checks trees against the verifier at setup
        # Acceptance per depth of a greedy chain on held-out verifier text, as training recorded it:
        # goodput control's estimate of a level's worth before it has seen this drafter's drafts.
        record = (getattr(model, "training_record", None) or {}).get("eval") or {}
        self.acceptance_prior = [float(record[f"eval/chain_acc_step{i}"]) for i in range(16) if f"eval/chain_acc_step{i}" in record] or None
        self.start([])

    @property
    def detail(self) -> str:
        if self.tree == "chain":
            return "chain"
        if self.tree == "auto":
            return f"dynamic tree, top-{self.top_k} per level, size chosen per step"
        return f"dynamic tree of {self.tree} nodes (top-{self.top_k})"

    def start(self, prompt_ids: list[int]) -> None:
        n = self.model.config.num_layers
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.length = 0  # rows held in the cache (real rows first, then this proposal's draft rows)
        self.n_real = 0

    # -- one forward over new rows ---------------------------------------------------------
    def _reserve(self, i: int, k: torch.Tensor, v: torch.Tensor, extra: int) -> None:
        """Room in layer i's cache for ``extra`` more rows (doubling, so appends are amortised O(1))."""
        cur = self.keys[i]
        need = self.length + extra
        if cur is not None and cur.shape[2] >= need:
            return
        cap = max(64, need, 2 * (cur.shape[2] if cur is not None else 0))
        keys = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
        values = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        if cur is not None and self.length:
            keys[:, :, : self.length] = cur[:, :, : self.length]
            values[:, :, : self.length] = self.values[i][:, :, : self.length]
        self.keys[i], self.values[i] = keys, values

    def _run(self, hidden: torch.Tensor, tokens: list[int], positions: list[int], visible: torch.Tensor | None) -> torch.Tensor:
        """Run rows (feature or parent output ``hidden`` [Q, H], their ``tokens``) through the layers,
        appending their keys and values to the cache. ``visible`` [Q, length] bool says which
        cached rows each new row sees (None: all of them); new rows see themselves and, when
        ``visible`` is None, the new rows before them. Returns the pre-norm outputs [Q, H]."""
        device = hidden.device
        Q = len(tokens)
        embeds = self.embed(torch.tensor([tokens], device=device)).to(hidden.dtype)
        cos, sin = self.model.rope(hidden, torch.tensor([positions], device=device))
        start = self.length
        if visible is None:
            mask = None if start == 0 else torch.ones(Q, start + Q, dtype=torch.bool, device=device).tril(start)
        else:
            mask = torch.cat([visible, torch.eye(Q, dtype=torch.bool, device=device)], 1)
        x = hidden[None]
        for i, layer in enumerate(self.model.layer_stack):

            def attend(q, k, v, i=i):
                self._reserve(i, k, v, Q)
                self.keys[i][:, :, start : start + Q] = k
                self.values[i][:, :, start : start + Q] = v
                att = layer.self_attn
                keys, values = self.keys[i][:, :, : start + Q], self.values[i][:, :, : start + Q]
                return F.scaled_dot_product_attention(q, att.expand(keys), att.expand(values), attn_mask=mask,
                                                      is_causal=mask is None and Q > 1)

            x = layer(embeds, x, cos, sin, attend)
        self.length = start + Q
        return x[0]

    def _to_target(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., Vd] -> verifier-vocabulary logits, -inf outside it."""
        out = draft_logits.new_full((*draft_logits.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.draft_ids] = draft_logits
        return out

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Candidates:
        if ctx.hidden_states is None:
            raise RuntimeError("Eagle3Drafter needs the verifier's hidden states")
        tokens = ctx.tokens
        n = len(tokens) - 1  # index of the pending token; real rows are 0 .. n - 1
        self.length = self.n_real  # drop the last proposal's draft rows
        fresh = n - self.n_real  # rows the verifier produced since the last proposal
        aux = torch.cat([h[-fresh:] for h in ctx.hidden_states], -1)
        if aux.shape[0] != fresh:
            raise RuntimeError(f"EAGLE-3 drafter expected {fresh} new feature rows, got {aux.shape[0]}")
        feat = self.model.fuse(aux.to(self.model.fc.weight.dtype))
        out = self._run(feat, tokens[self.n_real + 1 : n + 1], list(range(self.n_real, n)), None)
        self.n_real = n
        root = out[-1]
        k = ctx.num_draft_tokens
        if self.tree == "chain":
            return self._chain(root, n, k, ctx)
        return self._dynamic_tree(root, n, k, ctx)

    def _chain(self, hidden: torch.Tensor, n: int, k: int, ctx: DraftContext) -> Candidates:
        drafts, probs, scores = [], [], []
        for d in range(k):
            if d and ctx.keep_going is not None and not ctx.keep_going(d + 1, [scores]):
                break
            logits = self.model.logits(hidden).float()
            if ctx.sampling.greedy:
                p = torch.softmax(logits, -1)
                j = int(p.argmax())
                token, score = self._draft_ids_list[j], float(p[j])
            else:
                token, q = draw(self._to_target(logits), ctx.sampling, ctx.generator)
                probs.append(q)
                score = float(q[token])
            drafts.append(token)
            scores.append(score)
            ctx.levels_drafted = d + 1
            if d + 1 < k:  # the row of the drafted token sits at position n + d
                hidden = self._run(hidden[None], [token], [n + d], None)[0]
        return Candidates.chain(drafts, torch.stack(probs) if probs else None, scores=scores)

    def _dynamic_tree(self, root: torch.Tensor, n: int, depth: int, ctx: DraftContext) -> Candidates:
        """EAGLE-2: expand the top-k nodes by cumulative draft log-probability for ``depth``
        levels, then keep the best nodes (``self.tree`` of them, or all for goodput control). A
        child never scores above its parent, so the kept set is a connected tree. Tokens are
        chosen, not sampled (q one-hot per node), which the tree rejection rule handles exactly at
        any temperature. Each node's score is its draft probability given its parent."""
        top_k = self.top_k
        device = root.device
        lp = torch.log_softmax(self.model.logits(root).float(), -1)
        v, i = lp.topk(min(top_k, lp.numel()))
        tok = [self._draft_ids_list[j] for j in i.tolist()]
        cum = v.tolist()
        cond = v.exp().tolist()
        parent = [-1] * len(tok)
        path_scores = [[c] for c in cond]  # node -> draft probabilities down its path
        frontier = list(range(len(tok)))
        frontier_hidden = root[None].expand(len(frontier), -1)
        # node -> the draft rows it sees once run: its ancestors' rows and its own
        sees: dict[int, list[int]] = {}
        ctx.levels_drafted = 1
        for level in range(1, depth):
            if ctx.keep_going is not None and not ctx.keep_going(level + 1, [path_scores[f] for f in frontier]):
                break
            Q, base = len(frontier), self.length
            visible = torch.zeros(Q, base, dtype=torch.bool, device=device)
            visible[:, : self.n_real] = True
            for r, node in enumerate(frontier):
                rows = sees.get(parent[node], [])
                if rows:
                    visible[r, rows] = True
                sees[node] = rows + [base + r]
            out = self._run(frontier_hidden, [tok[f] for f in frontier], [n + level - 1] * Q, visible)
            lp = torch.log_softmax(self.model.logits(out).float(), -1)  # [Q, Vd]
            v, i = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            total = torch.tensor([cum[f] for f in frontier], device=v.device)[:, None] + v
            first = len(tok)
            kids_per = v.shape[1]
            for r, node in enumerate(frontier):
                for c, (s, j, lv) in enumerate(zip(total[r].tolist(), i[r].tolist(), v[r].tolist())):
                    tok.append(self._draft_ids_list[j])
                    parent.append(node)
                    cum.append(s)
                    p = math.exp(lv)
                    cond.append(p)
                    path_scores.append(path_scores[node] + [p])
            children = torch.arange(first, len(tok))
            best = total.flatten().topk(min(top_k, total.numel())).indices
            frontier = children[best].tolist()
            frontier_hidden = out[best // kids_per]
            ctx.levels_drafted = level + 1
        budget = self.MAX_TREE_NODES if self.tree == "auto" else int(self.tree)
        # Best `budget` nodes; ties keep the shallower (earlier) node so parents come first.
        keep = sorted(sorted(range(len(tok)), key=lambda c: (-cum[c], c))[:budget])
        index = {old: new for new, old in enumerate(keep)}
        parents = [-1 if parent[c] < 0 else index[parent[c]] for c in keep]
        return Candidates(torch.tensor([tok[c] for c in keep], dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                          scores=torch.tensor([cond[c] for c in keep], dtype=torch.float32))

    def observe(self, num_accepted: int, emitted: list[int]) -> None:
        pass  # the next propose() drops the draft rows and adds the accepted tokens' true rows


# -------------------------------------------------------------------------- checkpoints


def vllm_config(cfg: Eagle3Config) -> dict:
    """The top-level config keys vLLM's ``eagle3`` loader reads (Llama-style, plus the EAGLE-3 ones)."""
    llama = cfg.llama_config().to_dict()
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "max_position_embeddings", "hidden_act", "rope_parameters", "attention_bias", "mlp_bias")
    out = {k: llama[k] for k in keep if k in llama}
    rope = cfg.rope_parameters
    out.update({
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.hidden_size,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "tie_word_embeddings": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids), "use_aux_hidden_state": True},
    })
    return out


def save_eagle3(path, model: Eagle3Model, verifier, training: dict | None = None):
    cfg = model.config
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    hp = asdict(cfg)
    if training:
        hp["training"] = training
    return save_drafter(path, KIND, state, hp, verifier_info(verifier), vllm_config(cfg))


def load_eagle3_model(path, verifier=None) -> Eagle3Model:
    config, tensors = load_drafter_state(path, verifier, expected_kind=KIND)
    hp = {k: v for k, v in config["specheads"]["hyper_parameters"].items() if k != "training"}
    try:
        cfg = Eagle3Config(**hp)
    except TypeError as exc:
        raise SpecHeadsError(f"EAGLE-3 checkpoint {path}: config keys do not match ({exc})") from exc
    if verifier is not None and cfg.num_verifier_layers != verifier_depth(verifier):
        raise SpecHeadsError(f"EAGLE-3 checkpoint {path} reads a verifier of {cfg.num_verifier_layers} layers; "
                             f"'{verifier.name}' has {verifier_depth(verifier)}")
    model = Eagle3Model(cfg, d2t=tensors.get("d2t"))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise SpecHeadsError(f"EAGLE-3 checkpoint {path}: tensor shapes do not match its config ({str(exc).splitlines()[0]})") from exc
    missing = [k for k in missing if not k.startswith("rotary.")]
    if missing or unexpected:
        raise SpecHeadsError(f"EAGLE-3 checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.training_record = config["specheads"]["hyper_parameters"].get("training") or {}
    return model


def load_eagle3_drafter(path, verifier, *, tree: str | int = "auto", draft_vocab: int = 0, top_k: int = 4, **_) -> Eagle3Drafter:
    if draft_vocab:
        raise SpecHeadsError(f"--draft-vocab {draft_vocab} is for draft models; an EAGLE-3 drafter fixes its draft vocabulary "
                             "when it is trained (drafter.draft_vocab_size in the recipe)")
    return Eagle3Drafter(load_eagle3_model(path, verifier), verifier, tree=tree, top_k=top_k)
