"""What an EAGLE-3 drafter learns: the verifier's next-token distribution, several steps ahead.

Training-time test (``Eagle3Model.ttt_forward``) unrolls ``ttt_steps`` draft steps, each fed
the drafter's own previous output, so that drafting deep in a chain is trained, not just its
first step. Step i at index t predicts the token at t + 2 + i; its target is the verifier's
distribution at t + 1 + i restricted to the draft vocabulary and renormalised (soft
cross-entropy), weighted ``ttt_decay ** i``. Positions whose verifier argmax lies outside the
draft vocabulary are left out of the loss (no draft could be accepted there), but evaluation
counts them as misses, so its acceptance is what decoding will see. Each step's sum is divided
by the positions it scores (``loss_normalization: valid``) or, as the original EAGLE-3 trainer's
``.mean()`` does, by every position of the padded batch (``all``: batch x length for every step,
so the later steps, which score fewer positions, weigh a little less).

What the frozen verifier contributes per token (its ``aux_layer_ids`` hidden states, its last
hidden state for the target distribution, and its argmax) is kept on disk
(``training.cache_hidden_states``) in a ``training.features.FeatureStore``, found by each
conversation's tokens: self-distillation stores it while it generates, the first epoch stores
what is missing, and later epochs, evaluations and other recipes over the same conversations run
no verifier forward.
"""

from __future__ import annotations

import torch

from ...draft_vocab import build_token_map
from ...drafters.eagle3 import (FC_INITS, QKV_INPUTS, Eagle3Config, Eagle3Model, draft_vocab_d2t, init_from_verifier,
                                layer_init_sources, save_eagle3)
from ...errors import SpecHeadsError
from ..features import UNKNOWN_ARGMAX, FeatureStore, tokens_key
from ..sharded_verifier import all_agree

LOSSES = ("soft",)
LOSS_NORMALIZATIONS = ("valid", "all")  # objective.loss_normalization: what a step's loss sum is divided by
RANKS = 4  # choices per step counted at evaluation (what a tree of top-k children could accept)
EVAL_STEPS = 5  # draft steps evaluated at least (a chain of 5 for the chain-tau estimate)


def predicted_chain_tau(chain_acceptance, k: int) -> float | None:
    """The tau of a greedy chain of ``k`` drafts: 1 + sum over i < k of prod over j <= i of a_j,
    where a_j (``chain_acceptance``, ``eval/chain_acc_step{j}``) is step j's acceptance given
    every earlier step was accepted; a verify step emits its accepted drafts and the verifier's
    own token. None when fewer than ``k`` steps were evaluated."""
    if k < 0 or k > len(chain_acceptance):
        return None
    tau, run = 1.0, 1.0
    for a in list(chain_acceptance)[:k]:
        run *= float(a)
        tau += run
    return tau


def check_recipe(recipe) -> None:
    o, dr = recipe.objective, recipe.drafter
    for key, value, ok in (
        ("objective.ttt_steps", o.ttt_steps, isinstance(o.ttt_steps, int) and 1 <= o.ttt_steps <= 16),
        ("objective.ttt_decay", o.ttt_decay, 0 < o.ttt_decay <= 1),
        ("drafter.num_layers", dr.num_layers, dr.num_layers >= 1),
        ("drafter.draft_vocab_size", dr.draft_vocab_size, dr.draft_vocab_size is None or dr.draft_vocab_size >= 1),
    ):
        if not ok:
            raise SpecHeadsError(f"recipe value {key}={value!r} is out of range")
    if dr.aux_layer_ids is not None and (not isinstance(dr.aux_layer_ids, list) or not dr.aux_layer_ids):
        raise SpecHeadsError(f"recipe value drafter.aux_layer_ids={dr.aux_layer_ids!r} must be a non-empty list of layer ids")
    for key, value, allowed in (("drafter.init_qkv_input", dr.init_qkv_input, tuple(QKV_INPUTS)), ("drafter.init_fc", dr.init_fc, FC_INITS),
                                ("objective.loss_normalization", o.loss_normalization, LOSS_NORMALIZATIONS)):
        if value not in allowed:
            raise SpecHeadsError(f"recipe value {key}={value!r} is not one of {', '.join(allowed)}")
    if dr.init_layer is not None and (isinstance(dr.init_layer, bool) or not isinstance(dr.init_layer, int) or dr.init_layer < 0):
        raise SpecHeadsError(f"recipe value drafter.init_layer={dr.init_layer!r} must be a verifier decoder layer index (0, 1, ...)")
    if dr.init_layer is None and dr.init_qkv_input != "feature":
        raise SpecHeadsError(f"recipe value drafter.init_qkv_input={dr.init_qkv_input!r} places a verifier layer's q/k/v: it needs drafter.init_layer")


def check_for_verifier(recipe, verifier) -> None:
    """Aux layer ids, the draft vocabulary size and the verifier layer the drafter starts from
    (drafter.init_layer) against the verifier, before any data is made."""
    cfg = Eagle3Config.from_verifier(verifier, recipe.drafter.draft_vocab_size or verifier.vocab_size,
                                     recipe.drafter.aux_layer_ids, recipe.drafter.num_layers)
    if recipe.drafter.init_layer is not None:
        layer_init_sources(cfg, verifier, recipe.drafter.init_layer)


def feature_capture(recipe, verifier):
    """(FeatureStore, aux layer ids, max_length) for self-distillation to store each conversation's
    features from its own generation pass, or None when the recipe keeps no features."""
    if not recipe.training.cache_hidden_states:
        return None
    aux = Eagle3Config.from_verifier(verifier, recipe.drafter.draft_vocab_size or verifier.vocab_size,
                                     recipe.drafter.aux_layer_ids, recipe.drafter.num_layers).aux_layer_ids
    return FeatureStore(recipe.training.hidden_cache_path(), verifier, aux), aux, recipe.data.max_length


def build(recipe, verifier, train_ds) -> "Eagle3Objective":
    size = recipe.drafter.draft_vocab_size or verifier.vocab_size
    check_for_verifier(recipe, verifier)
    token_map = build_token_map(train_ds, verifier.vocab_size, size)
    return Eagle3Objective(verifier, recipe.drafter, recipe.objective, token_map)


class Eagle3Objective:
    # The drafter's methods the loss calls instead of forward: FSDP2 gathers a sharded module's
    # weights only around calls it knows of, so the loop registers these (register_fsdp_forward_method).
    drafter_methods = ("ttt_forward", "logits")

    def __init__(self, verifier, drafter_cfg, objective_cfg, token_map: torch.Tensor):
        self.verifier = verifier
        cfg = Eagle3Config.from_verifier(verifier, int(token_map.numel()), drafter_cfg.aux_layer_ids, drafter_cfg.num_layers)
        model = Eagle3Model(cfg, d2t=draft_vocab_d2t(token_map))
        # (getattr: scripts and tests pass namespaces with the older keys only)
        init_from_verifier(model, verifier, layer=getattr(drafter_cfg, "init_layer", None),
                           qkv_input=getattr(drafter_cfg, "init_qkv_input", "feature"), fc=getattr(drafter_cfg, "init_fc", "random"))
        self.config = cfg
        self.module = model
        self.steps = objective_cfg.ttt_steps
        self.normalization = getattr(objective_cfg, "loss_normalization", "valid")
        self.weights = [objective_cfg.ttt_decay**i for i in range(self.steps)]
        V = verifier.vocab_size
        self.draft_ids = model.draft_to_target()  # draft id -> verifier id
        to_draft = torch.full((V,), -1, dtype=torch.long)
        to_draft[self.draft_ids] = torch.arange(cfg.draft_vocab_size)
        self.to_draft = to_draft
        self.hidden_cache = None  # a FeatureStore, opened by the loop through open_hidden_cache
        self._head_rows = None

    # -- parameters -------------------------------------------------------------------------
    def param_groups(self, module, lr: float, weight_decay: float) -> list[dict]:
        params = [p for p in _unwrap(module).parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "eagle3"}]

    # -- what the verifier contributes --------------------------------------------------------
    def open_hidden_cache(self, path: str, lengths: list[int], key: str, create: bool) -> "FeatureStore":
        """The feature store under ``path`` (keyed by each conversation's tokens, not by this
        dataset: ``lengths`` and ``key`` are not needed)."""
        return FeatureStore(path, self.verifier, self.config.aux_layer_ids)

    def describe_cache(self, lengths: list[int]) -> str:
        per_token = (len(self.config.aux_layer_ids) + 1) * self.verifier.hidden_size * self.verifier.dtype.itemsize + 8
        return f"features of {sum(lengths)} tokens, {per_token} bytes each = {sum(lengths) * per_token / 2**20:.1f} MiB at most"

    def _verifier_features(self, batch):
        """(aux [B, T, n_aux * H], last hidden [B, T, H], argmax [B, T]) of the frozen verifier:
        read from the feature store when every conversation of the batch is in it, else computed
        by one forward and stored."""
        store = self.hidden_cache
        ids = batch["input_ids"]
        keys = None
        if store is not None:
            lengths = batch["attention_mask"].sum(1).tolist()
            rows = ids.tolist()
            keys = [tokens_key(r[:n]) for r, n in zip(rows, lengths)]
            # a sharded verifier's forward runs on every process or on none (sharded_verifier.all_agree)
            if all_agree(self.verifier.model, all(store.has(k) for k in keys)):
                return store.get(keys, ids.shape[1], ids.device)
        model = self.verifier.model
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in self.config.aux_layer_ids], -1)
        last, argmax = out.hidden_states[-1], out.logits.argmax(-1)
        if store is not None:
            store.put([(k, aux[b, :n], last[b, :n], argmax[b, :n]) for b, (k, n) in enumerate(zip(keys, lengths))])
        return aux, last, argmax

    def _teacher_rows(self, device, dtype) -> torch.Tensor:
        """The verifier's LM-head rows of the draft vocabulary, cut once."""
        if self._head_rows is None or self._head_rows.device != device:
            head = self.verifier.model.get_output_embeddings().weight.detach()
            self._head_rows = head[self.draft_ids.to(head.device)].to(device, dtype)
        return self._head_rows

    def _steps(self, module, batch, steps: int, teacher: bool = True):
        """Per draft step i: (student logits [N, Vd], teacher log-probabilities over the draft
        vocabulary [N, Vd] or None, verifier argmax [N], valid [B, T - 2 - i]) at the valid
        positions (the predicted token is an answer token inside the sequence)."""
        model = _unwrap(module)
        aux, last, argmax = self._verifier_features(batch)
        dtype = model.fc.weight.dtype
        ids = batch["input_ids"]
        outs = model.ttt_forward(aux.to(dtype), ids, self.verifier.model.get_input_embeddings(), steps)
        T = ids.shape[1]
        answer = batch["answer_mask"].bool()
        targets = where = None
        if teacher:
            # Every step reads the same distributions, shifted: compute them once, and only at the
            # positions j whose next token is an answer token (no prompt, no padding).
            need = torch.zeros_like(answer)
            need[:, :-1] = answer[:, 1:]
            where = torch.full(answer.shape, -1, dtype=torch.long, device=answer.device)
            where[need] = torch.arange(int(need.sum()), device=answer.device)
            with torch.no_grad():
                targets = torch.log_softmax((last[need] @ self._teacher_rows(last.device, last.dtype).T).float(), -1)
        rows = []
        for i, out in enumerate(outs):
            # index t predicts the token at t + 2 + i from the verifier's distribution at t + 1 + i
            n = T - 2 - i
            if n <= 0:
                rows.append(None)
                continue
            valid = answer[:, 2 + i :]
            if not teacher:  # evaluation scores only positions whose verifier argmax is known
                valid = valid & (argmax[:, 1 + i : 1 + i + n] != UNKNOWN_ARGMAX)
            student = model.logits(out[:, :n][valid])
            target = None if targets is None else targets[where[:, 1 + i : 1 + i + n][valid]]
            rows.append((student, target, argmax[:, 1 + i : 1 + i + n][valid], valid))
        return rows

    # -- the loss ---------------------------------------------------------------------------
    def loss(self, module, batch, normalize=None) -> tuple[torch.Tensor, dict]:
        normalize = normalize or (lambda count: count)
        total = None
        metrics = {}
        positions = float(batch["input_ids"].numel())  # loss_normalization all: every position of the padded batch
        for i, row in enumerate(self._steps(module, batch, self.steps)):
            if row is None:
                continue
            student, target, argmax, _ = row
            # (an argmax no forward computed is trained on: the target distribution is known)
            in_vocab = (self.to_draft.to(argmax.device)[argmax.clamp_min(0)] >= 0) | (argmax == UNKNOWN_ARGMAX)
            logq = torch.log_softmax(student[in_vocab].float(), -1)
            step_sum = -(target[in_vocab].exp() * logq).sum()
            count = in_vocab.sum().float() if self.normalization == "valid" else step_sum.new_tensor(positions)
            step_loss = step_sum / normalize(count).clamp_min(1.0)
            total = self.weights[i] * step_loss if total is None else total + self.weights[i] * step_loss
            metrics[f"loss/step{i}"] = float(step_loss.detach())
        if total is None:  # a batch with no answer position to predict
            total = sum(p.sum() * 0.0 for p in _unwrap(module).parameters() if p.requires_grad)
        metrics["loss"] = float(total.detach())
        return total, metrics

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def eval_counts(self, module, batch) -> dict[str, torch.Tensor]:
        """Per step: hits of the draft's rank-r token on the verifier's argmax (out-of-vocabulary
        argmaxes count as misses), the same given every earlier step had it in its top RANKS (what
        a tree could reach), the same given every earlier step's top-1 was a hit (what a chain
        sees: on the verifier's own text, decoding's acceptance at that position), and the run of
        consecutive top-1 hits from step 0 (a chain's tau)."""
        steps = max(self.steps, EVAL_STEPS)
        rows = self._steps(module, batch, steps, teacher=False)
        B, T = batch["input_ids"].shape
        valid_at = torch.zeros(steps, dtype=torch.long)
        rank_hits = torch.zeros(steps, RANKS, dtype=torch.long)
        cond_hits = torch.zeros(steps, RANKS, dtype=torch.long)
        cond_valid = torch.zeros(steps, dtype=torch.long)
        chain_hits = torch.zeros(steps, dtype=torch.long)
        chain_valid = torch.zeros(steps, dtype=torch.long)
        top1 = torch.zeros(B, T, steps, dtype=torch.bool)
        reached = torch.ones(B, T, dtype=torch.bool)  # earlier steps all had the token in their top RANKS
        chained = torch.ones(B, T, dtype=torch.bool)  # earlier steps' top-1 all hit
        base = None
        for i, row in enumerate(rows):
            if row is None:
                break
            student, _, argmax, valid = row
            valid = valid.cpu()
            n = valid.shape[1]
            ranked = self.draft_ids.to(student.device)[student.topk(min(RANKS, student.shape[-1]), -1).indices]
            at_rank = (ranked == argmax[:, None]).cpu()
            full = torch.zeros(B, n, at_rank.shape[-1], dtype=torch.bool)
            full[valid] = at_rank
            here = reached[:, :n] & valid
            valid_at[i] = valid.sum()
            rank_hits[i, : at_rank.shape[-1]] = at_rank.sum(0)
            cond_hits[i, : at_rank.shape[-1]] = (full & here[..., None]).sum((0, 1))
            cond_valid[i] = here.sum()
            top1[:, :n, i] = full[..., 0]
            alive = chained[:, :n] & valid
            chain_valid[i] = alive.sum()
            chain_hits[i] = (alive & full[..., 0]).sum()
            chained = chained[:, :n] & full[..., 0]
            reached = reached[:, :n] & full.any(-1)
            if i == 0:
                base = valid
        run = torch.cumprod(top1.int(), -1).sum(-1)
        positions = base.sum() if base is not None else torch.tensor(0)
        run_sum = run[:, : base.shape[1]][base].sum() if base is not None else torch.tensor(0)
        return {"valid": valid_at, "rank_hits": rank_hits, "cond_rank_hits": cond_hits, "cond_valid": cond_valid,
                "chain_hits": chain_hits, "chain_valid": chain_valid, "run_sum": run_sum, "positions": positions}

    @staticmethod
    def summarize(counts: dict[str, torch.Tensor]) -> dict[str, float]:
        acc = counts["rank_hits"].float() / counts["valid"].clamp_min(1).float()[:, None]
        cond = counts["cond_rank_hits"].float() / counts["cond_valid"].clamp_min(1).float()[:, None]
        out = {}
        chain = counts["chain_hits"].float() / counts["chain_valid"].clamp_min(1).float() if "chain_hits" in counts else None
        for i in range(acc.shape[0]):
            out[f"eval/top1_step{i}"] = float(acc[i, 0])
            if chain is not None:
                out[f"eval/chain_acc_step{i}"] = float(chain[i])
            out.update({f"eval/cond_rank{r}_step{i}": float(cond[i, r]) for r in range(cond.shape[1])})
        out["eval/top4_step0"] = float(acc[0].sum())
        # Chain tau implied by teacher-forced greedy data: 1 + mean run of consecutive hits.
        out["eval/tau_chain"] = 1.0 + float(counts["run_sum"]) / max(1, int(counts["positions"]))
        if chain is not None:
            # What serving a chain of k drafts should measure (bench --tree chain --control fixed -k K)
            out.update({f"eval/tau_pred_k{k}": predicted_chain_tau(chain.tolist(), k) for k in range(1, len(chain) + 1)})
        return out

    # -- the drafter checkpoint -------------------------------------------------------------
    def save(self, state_dict: dict, path, verifier=None, training: dict | None = None):
        model = Eagle3Model(self.config, d2t=state_dict["d2t"])
        state = {k: v for k, v in state_dict.items() if not k.startswith("rotary.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("rotary.")]
        if missing or unexpected:
            raise SpecHeadsError(f"EAGLE-3 training state does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return save_eagle3(path, model, verifier or self.verifier, training=training)


def _unwrap(module):
    return module.module if hasattr(module, "module") and not isinstance(module, Eagle3Model) else module
