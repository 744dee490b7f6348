"""What Medusa heads learn from the verifier (Medusa-1 frozen verifier, Medusa-2 with LoRA)."""

from __future__ import annotations

import torch
from torch import nn

from ...draft_vocab import build_token_map
from ...drafters.medusa import MedusaConfig, MedusaHeads, save_medusa
from ..losses import cross_entropy, forward_kl
from ..sharded_verifier import all_agree

LOSSES = ("ce", "kl")  # the first is the default


class MedusaTrainingModule(nn.Module):
    """Heads, plus the LoRA-wrapped verifier when it is tuned jointly (Medusa-2)."""

    def __init__(self, heads: MedusaHeads, tuned_verifier: nn.Module | None = None):
        super().__init__()
        self.heads = heads
        self.tuned_verifier = tuned_verifier


RANKS = 4  # choices per head counted at evaluation


class MedusaObjective:
    """Head k at position t predicts token t+2+k from the verifier's last hidden state h_t.

    Loss: sum_k w_k * CE(head_k(h_t), x_{t+2+k}) with w_k = head_decay**k, over positions whose
    target token lies in the answer (prompt tokens are masked). With ``loss: kl`` the target is
    the verifier's own distribution for that token (soft labels). Medusa-2 adds the verifier's
    LM loss on the answer tokens, weighted by ``lm_loss_weight``.
    """

    def __init__(self, verifier, drafter_cfg, objective_cfg, lora_cfg=None, token_map: torch.Tensor | None = None):
        self.verifier = verifier
        self.cfg = objective_cfg
        self.lora_cfg = lora_cfg
        self.medusa_cfg = MedusaConfig(
            hidden_size=verifier.hidden_size,
            vocab_size=verifier.vocab_size,
            num_heads=drafter_cfg.num_heads,
            num_layers=drafter_cfg.num_layers,
            shared_lm_head=drafter_cfg.shared_lm_head,
            draft_vocab_size=None if token_map is None else int(token_map.numel()),
        )
        heads = MedusaHeads(self.medusa_cfg, token_map=token_map)
        heads.init_lm_heads_from(verifier.model.get_output_embeddings().weight.detach().float().cpu())
        if heads.lm_heads is not None and not objective_cfg.train_lm_heads:
            heads.lm_heads.requires_grad_(False)
        tuned = None
        if lora_cfg is not None:
            from peft import LoraConfig, get_peft_model

            peft_cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, target_modules=list(lora_cfg.target_modules))
            tuned = get_peft_model(verifier.model, peft_cfg)
        self.module = MedusaTrainingModule(heads, tuned)
        self.hidden_cache = None  # a HiddenStateCache, set by the loop when the recipe asks for one
        self.weights = [objective_cfg.head_decay**k for k in range(self.medusa_cfg.num_heads)]
        V = verifier.vocab_size
        if token_map is not None:  # verifier id -> draft id, -100 where the draft vocabulary has no entry
            inverse = torch.full((V,), -100, dtype=torch.long)
            inverse[token_map.long()] = torch.arange(token_map.numel())
            self.to_draft = inverse
        else:
            self.to_draft = None

    # -- parameters -------------------------------------------------------------------------
    def param_groups(self, module, lr: float, weight_decay: float) -> list[dict]:
        groups = [{"params": [p for p in _unwrap(module).heads.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay, "name": "heads"}]
        if self.lora_cfg is not None:
            lora = [p for n, p in _unwrap(module).tuned_verifier.named_parameters() if p.requires_grad]
            groups.append({"params": lora, "lr": self.lora_cfg.lr, "weight_decay": 0.0, "name": "lora"})
        return groups

    # -- forward pieces ---------------------------------------------------------------------
    def _verifier_out(self, module, batch):
        """(last hidden states [B, T, H], verifier logits [B, T, V] or None when not needed)."""
        m = _unwrap(module)
        cache = self.hidden_cache if m.tuned_verifier is None and "index" in batch else None
        if cache is not None:
            indices = batch["index"].tolist()
            # a sharded verifier's forward runs on every process or on none (sharded_verifier.all_agree)
            if all_agree(self.verifier.model, cache.has(indices)):
                hidden = cache.load(indices, batch["input_ids"].shape[1], batch["input_ids"].device)
                logits = self.verifier.model.get_output_embeddings()(hidden) if self.cfg.loss == "kl" else None
                return hidden, logits
        model = m.tuned_verifier if m.tuned_verifier is not None else self.verifier.model
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        if m.tuned_verifier is not None:
            out = model(**kwargs)
        else:
            with torch.no_grad():
                out = model(**kwargs)
        if cache is not None:
            cache.store(indices, out.hidden_states[-1])
        return out.hidden_states[-1], out.logits

    def _targets(self, batch, k: int):
        """(positions mask [B, T-2-k], labels [B, T-2-k]) for head k."""
        ids, answer = batch["input_ids"], batch["answer_mask"]
        shift = 2 + k
        labels = ids[:, shift:]
        mask = answer[:, shift:].bool()
        return mask, labels

    def _head_logits(self, module, hidden_rows: torch.Tensor, k: int) -> torch.Tensor:
        heads = _unwrap(module).heads
        block = heads.blocks[k]
        x = hidden_rows
        for layer in block["layers"]:
            x = layer(x)
        if heads.lm_heads is None:
            return nn.functional.linear(x, heads.shared_rows(self.verifier.model.get_output_embeddings().weight))
        return heads.lm_heads[k](x)

    def _draft_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self.to_draft is None else self.to_draft.to(labels.device)[labels]

    # -- the loss ---------------------------------------------------------------------------
    def loss(self, module, batch, normalize=None) -> tuple[torch.Tensor, dict]:
        """``normalize(count)`` turns a local row count into the per-process share of the global
        count (the loop passes an all-reduce); by default the local count: a plain mean."""
        normalize = normalize or (lambda count: count)

        def mean(pair):
            total, count = pair
            return total / normalize(count.float()).clamp_min(1.0)

        hidden, verifier_logits = self._verifier_out(module, batch)
        hidden = hidden.to(next(_unwrap(module).heads.parameters()).dtype)
        T = hidden.shape[1]
        total = hidden.new_zeros(())
        metrics = {}
        for k, w in enumerate(self.weights):
            if T <= 2 + k:
                break
            mask, labels = self._targets(batch, k)
            rows = hidden[:, : T - 2 - k][mask]
            logits = self._head_logits(module, rows, k)
            if self.cfg.loss == "kl":
                teacher = verifier_logits[:, 1 + k : T - 1][mask].detach()
                if self.to_draft is not None:
                    teacher = teacher[:, _unwrap(module).heads.token_map]
                head_loss = mean(forward_kl(logits, teacher))
            else:
                head_loss = mean(cross_entropy(logits, self._draft_labels(labels[mask])))
            total = total + w * head_loss
            metrics[f"loss/head{k}"] = float(head_loss.detach())
        if self.lora_cfg is not None and self.lora_cfg.lm_loss_weight > 0:
            mask = batch["answer_mask"][:, 1:].bool()
            lm = mean(cross_entropy(verifier_logits[:, :-1][mask], batch["input_ids"][:, 1:][mask]))
            total = total + self.lora_cfg.lm_loss_weight * lm
            metrics["loss/verifier_lm"] = float(lm.detach())
        metrics["loss"] = float(total.detach())
        return total, metrics

    @torch.no_grad()
    def eval_counts(self, module, batch) -> dict[str, torch.Tensor]:
        """Per head top-1 hits and the length of each position's run of consecutive hits."""
        hidden, _ = self._verifier_out(module, batch)
        hidden = hidden.to(next(_unwrap(module).heads.parameters()).dtype)
        B, T, _ = hidden.shape
        K = len(self.weights)
        heads = _unwrap(module).heads
        hits = torch.zeros(B, T, K, dtype=torch.bool, device=hidden.device)
        valid = torch.zeros(B, T, K, dtype=torch.bool, device=hidden.device)
        # rank_hits[k, r]: positions where head k's r-th choice is the token (what a tree's
        # rank-r node would accept). cond_*: the same counted only where every earlier head had
        # its token among its top RANKS, i.e. where a tree could have reached depth k. Heads read
        # one hidden state, so their errors are correlated: the conditional rates are what the
        # data-driven trees (tree "autoN") are built from.
        rank_hits = torch.zeros(K, RANKS, dtype=torch.long)
        cond_hits = torch.zeros(K, RANKS, dtype=torch.long)
        cond_valid = torch.zeros(K, dtype=torch.long)
        reached = torch.ones(B, T, dtype=torch.bool, device=hidden.device)  # earlier heads all in their top RANKS
        for k in range(K):
            if T <= 2 + k:
                break
            mask, labels = self._targets(batch, k)
            logits = self._head_logits(module, hidden[:, : T - 2 - k], k)
            ranked = heads.to_verifier_ids(logits.topk(min(RANKS, logits.shape[-1]), dim=-1).indices)
            pred = ranked[..., 0]
            hits[:, : T - 2 - k, k] = (pred == labels) & mask
            valid[:, : T - 2 - k, k] = mask
            at_rank = (ranked == labels[..., None]) & mask[..., None]
            rank_hits[k, : at_rank.shape[-1]] = at_rank.sum((0, 1)).cpu()
            here = reached[:, : T - 2 - k] & mask
            cond_hits[k, : at_rank.shape[-1]] = (at_rank & here[..., None]).sum((0, 1)).cpu()
            cond_valid[k] = here.sum().cpu()
            reached = reached[:, : T - 2 - k] & at_rank.any(-1)
        base = valid[..., 0]
        # Run length of consecutive correct heads from head 0, counted where head 0 has a target.
        run = torch.cumprod(hits.int(), dim=-1).sum(-1)
        return {
            "hits": hits.sum((0, 1)).cpu(),
            "rank_hits": rank_hits,
            "cond_rank_hits": cond_hits,
            "cond_valid": cond_valid,
            "valid": valid.sum((0, 1)).cpu(),
            "run_sum": run[base].sum().cpu(),
            "positions": base.sum().cpu(),
        }

    @staticmethod
    def summarize(counts: dict[str, torch.Tensor]) -> dict[str, float]:
        acc = (counts["hits"].float() / counts["valid"].clamp_min(1).float()).tolist()
        out = {f"eval/top1_head{k}": a for k, a in enumerate(acc)}
        if "rank_hits" in counts:  # head k's rank-r accuracy, r >= 1 (rank 0 is top1_head{k})
            rank_acc = counts["rank_hits"].float() / counts["valid"].clamp_min(1).float()[:, None]
            out.update({f"eval/rank{r}_head{k}": float(rank_acc[k, r]) for k in range(rank_acc.shape[0]) for r in range(1, rank_acc.shape[1])})
        if "cond_rank_hits" in counts:  # the same, given that every earlier head had its token in its top ranks
            cond = counts["cond_rank_hits"].float() / counts["cond_valid"].clamp_min(1).float()[:, None]
            out.update({f"eval/cond_rank{r}_head{k}": float(cond[k, r]) for k in range(cond.shape[0]) for r in range(cond.shape[1])})
        # Chain tau implied on self-distilled greedy data: 1 + mean consecutive accepted drafts.
        out["eval/tau_top1_chain"] = 1.0 + float(counts["run_sum"]) / max(1, int(counts["positions"]))
        return out

    def save(self, state_dict: dict, path, verifier=None, training: dict | None = None):
        """Write the drafter checkpoint from the training module's full state dict."""
        heads_state = {k[len("heads."):]: v for k, v in state_dict.items() if k.startswith("heads.")}
        heads = MedusaHeads(self.medusa_cfg, token_map=heads_state.get("token_map"))
        heads.load_state_dict(heads_state, strict=True)
        return save_medusa(path, heads, verifier or self.verifier, training=training)


def build(recipe, verifier, train_ds) -> MedusaObjective:
    token_map = None
    if recipe.drafter.draft_vocab_size:
        token_map = build_token_map(train_ds, verifier.vocab_size, recipe.drafter.draft_vocab_size)
    return MedusaObjective(verifier, recipe.drafter, recipe.objective, recipe.training.lora, token_map=token_map)


def _unwrap(module):
    return module.module if hasattr(module, "module") and not isinstance(module, MedusaTrainingModule) else module
