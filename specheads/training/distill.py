"""Distilling a small standalone draft model from the verifier (DistillSpec, Zhou et al. 2023).

The student (``specheads.student``: cut from the verifier, a given model, or a fresh config)
learns the verifier's full next-token distribution at every answer position of a sequence:
teacher = the frozen verifier's logits on that same sequence, loss = one divergence from
``losses.DIVERGENCES`` (fkl, rkl, jsd, tvd), optionally plus CE on the data's tokens. Prompt
positions are context only.

Data: the recipe's dataset (fixed conversations or the verifier's own answers), and, on-policy,
with probability ``on_policy_fraction`` per example, the student's own continuation of the
prompt, scored by the verifier. The sampling seed of each step is drawn from the global torch
RNG, which accelerate checkpoints, so a resumed run samples exactly what the uninterrupted run
did.

Evaluation on held-out answers reports what speculative decoding will see: the student's top-1
agreement with the verifier (the acceptance rate of greedy drafts), the acceptance rate of
speculative sampling sum min(p, q) = 1 - TVD at T = 1 (and at the recipe's temperature), and the
mean accepted length tau a chain of k drafts would reach if every position were accepted
independently with that rate.

The drafter folder is a plain Hugging Face model directory (``save_pretrained``, safetensors, the
verifier's tokenizer beside it) whose ``config.json`` also carries the ``specheads`` block (kind
``draft_model``, hyper-parameters, verifier fingerprint): transformers, vLLM's draft-model
speculative decoding and specheads' own drafter registry all load it.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from ..atomic_files import atomic_directory
from ..checkpoint import CONFIG, FORMAT_VERSION, verifier_info
from ..draft_vocab import write_ranking
from ..errors import SpecHeadsError
from ..student import build_student
from .losses import DIVERGENCES, acceptance_rate, cross_entropy, divergence

KIND = "draft_model"
EVAL_DRAFT_TOKENS = 4  # the chain length whose implied tau evaluation prints


def chain_tau(alpha: float, k: int) -> float:
    """Mean tokens per verify step for k drafts, each accepted with probability alpha:
    1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)."""
    return float(sum(alpha**i for i in range(k + 1)))


class DistillObjective:
    def __init__(self, verifier, drafter_cfg, objective_cfg, *, seed: int = 0, trust_remote_code: bool = False,
                 token_counts: torch.Tensor | None = None):
        self.verifier = verifier
        self.token_counts = token_counts  # answer-token counts of the training data: the saved draft_vocab.json
        self.cfg = objective_cfg
        self.student_cfg = drafter_cfg.student
        student = build_student(drafter_cfg.student, verifier, seed=seed, trust_remote_code=trust_remote_code)
        student.requires_grad_(True)
        if drafter_cfg.student.freeze_embeddings:
            student.get_input_embeddings().requires_grad_(False)
            if student.get_output_embeddings() is not None:
                student.get_output_embeddings().requires_grad_(False)
        student.train()
        self.module = student
        self.student_class, self.student_config = type(student), student.config
        self.pad_id = (verifier.eos_token_ids or [0])[0]
        self.hidden_cache = None  # a HiddenStateCache of the verifier, set by the loop when the recipe asks

    # -- parameters -------------------------------------------------------------------------
    def param_groups(self, module, lr: float, weight_decay: float) -> list[dict]:
        params = [p for p in _unwrap(module).parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "student"}]

    # -- forward pieces ---------------------------------------------------------------------
    @staticmethod
    def _targets(batch) -> tuple[torch.Tensor, int]:
        """(mask [B, T-1] of positions whose next token is an answer token, first such position)."""
        targets = batch["answer_mask"][:, 1:].bool()
        used = targets.any(0).nonzero()
        return targets, int(used[0]) if len(used) else targets.shape[1]

    def _rows(self, module, batch, from_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student logits [N, V], verifier logits [N, V], next tokens [N]) at the answer positions.

        Logits are computed only from the first answer position on (``logits_to_keep``): with a
        large vocabulary the LM head is most of a small student's cost."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        targets, first = self._targets(batch)
        keep = ids.shape[1] - first
        mask = targets[:, first:]
        labels = ids[:, 1:][targets]
        if keep <= 1:  # no answer token to predict in this batch
            empty = torch.zeros(0, self.verifier.vocab_size, device=ids.device)
            return empty, empty, labels
        student = module(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1][mask]
        with torch.no_grad():
            teacher = self._teacher_logits(batch, targets, first, keep, from_cache)
        return student, teacher, labels

    def _teacher_logits(self, batch, targets, first: int, keep: int, from_cache: bool) -> torch.Tensor:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        model = self.verifier.model
        cache = self.hidden_cache if from_cache and "index" in batch else None
        if cache is None:
            return model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1][targets[:, first:]]
        indices = batch["index"].tolist()
        if cache.has(indices):  # the frozen verifier's last hidden states: only its LM head runs
            hidden = cache.load(indices, ids.shape[1], ids.device)
            return model.get_output_embeddings()(hidden[:, :-1][targets])
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, logits_to_keep=keep)
        cache.store(indices, out.hidden_states[-1])
        return out.logits[:, :-1][targets[:, first:]]

    # -- on-policy data ---------------------------------------------------------------------
    def _on_policy(self, module, batch) -> tuple[dict, int]:
        """The batch with a share of its answers replaced by the student's own continuations."""
        fraction = self.cfg.on_policy_fraction
        if fraction <= 0:
            return batch, 0
        # One draw from the global RNG per step: accelerate saves and restores it with the
        # checkpoint, so --resume replays the same choices and samples.
        step_seed = int(torch.randint(0, 2**31 - 1, (1,)))
        B = batch["input_ids"].shape[0]
        chosen = (torch.rand(B, generator=torch.Generator().manual_seed(step_seed)) < fraction).tolist()
        if not any(chosen):
            return batch, 0
        from .batches import collate

        ids, attn, answer = (batch[k].tolist() for k in ("input_ids", "attention_mask", "answer_mask"))
        rows = []
        for i in range(B):
            n, plen = sum(attn[i]), answer[i].index(1) if 1 in answer[i] else sum(attn[i])
            rows.append({"input_ids": ids[i][:n], "prompt_length": plen})
        picked = [i for i in range(B) if chosen[i]]
        answers = self._student_answers(module, [rows[i]["input_ids"][: rows[i]["prompt_length"]] for i in picked], step_seed)
        for i, ans in zip(picked, answers):
            rows[i] = {"input_ids": rows[i]["input_ids"][: rows[i]["prompt_length"]] + ans, "prompt_length": rows[i]["prompt_length"]}
        indices = batch["index"].tolist() if "index" in batch else None
        new = collate(rows, self.pad_id, indices)
        new = {k: v.to(batch["input_ids"].device) for k, v in new.items()}
        return new, len(picked)

    def _student_answers(self, module, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from .data import _generate_batch, _generation_config

        student = _unwrap(module)
        gen = _generation_config(self.verifier, self.cfg.on_policy_max_new_tokens, self.cfg.on_policy_temperature, 1.0, self.pad_id)
        was_training = student.training
        student.eval()
        try:
            # _generate_batch left-pads, samples under a forked RNG seeded with ``seed`` and cuts after eos.
            return _generate_batch(_AsVerifier(student, self.verifier), prompts, gen, self.pad_id, seed)
        finally:
            student.train(was_training)

    # -- the loss ---------------------------------------------------------------------------
    def loss(self, module, batch, normalize=None) -> tuple[torch.Tensor, dict]:
        """Divergence (+ ce_weight * CE) summed over answer positions, divided by ``normalize(count)``
        (the loop's global row count; a plain mean by default)."""
        normalize = normalize or (lambda count: count)
        batch, replaced = self._on_policy(module, batch)
        student, teacher, labels = self._rows(module, batch, from_cache=not replaced)
        c = self.cfg
        total_div, count = divergence(c.loss, student, teacher, temperature=c.temperature, beta=c.jsd_beta)
        loss = total_div / normalize(count.float()).clamp_min(1.0)
        metrics = {f"loss/{c.loss}": float(loss.detach()), "data/on_policy_examples": float(replaced)}
        if c.ce_weight > 0:
            total_ce, ce_count = cross_entropy(student, labels)
            ce = total_ce / normalize(ce_count.float()).clamp_min(1.0)
            loss = loss + c.ce_weight * ce
            metrics["loss/ce"] = float(ce.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def eval_counts(self, module, batch) -> dict[str, torch.Tensor]:
        student, teacher, _ = self._rows(module, batch, from_cache=False)
        c = self.cfg
        counts = {
            "rows": torch.tensor(float(student.shape[0])),
            "top1_agree": (student.argmax(-1) == teacher.argmax(-1)).sum().double(),
            "accept_t1": acceptance_rate(student, teacher, 1.0).sum().double(),
            "divergence": divergence(c.loss, student, teacher, temperature=c.temperature, beta=c.jsd_beta)[0].double(),
        }
        if c.temperature != 1.0:
            counts["accept_t"] = acceptance_rate(student, teacher, c.temperature).sum().double()
        return {k: v.cpu() for k, v in counts.items()}

    def summarize(self, counts: dict[str, torch.Tensor]) -> dict[str, float]:
        n = max(1.0, float(counts["rows"]))
        greedy, sampled = float(counts["top1_agree"]) / n, float(counts["accept_t1"]) / n
        k = EVAL_DRAFT_TOKENS
        out = {
            "eval/top1_agreement": greedy,  # = acceptance rate of greedy drafts at T = 0
            "eval/acceptance_T1": sampled,  # = 1 - TVD at T = 1
            f"eval/tau_k{k}_greedy": chain_tau(greedy, k),
            f"eval/tau_k{k}_T1": chain_tau(sampled, k),
            f"eval/{self.cfg.loss}": float(counts["divergence"]) / n,
        }
        if "accept_t" in counts:
            out[f"eval/acceptance_T{self.cfg.temperature:g}"] = float(counts["accept_t"]) / n
        return out

    # -- the drafter checkpoint -------------------------------------------------------------
    def save(self, state_dict: dict, path, verifier=None, training: dict | None = None):
        """A Hugging Face model directory plus the specheads block, from the student's full state dict."""
        verifier = verifier or self.verifier
        with torch.random.fork_rng():  # its random init must not move the RNG that on-policy sampling replays on resume
            model = self.student_class(self.student_config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is model.get_input_embeddings().weight}
        if unexpected or set(missing) - tied:
            raise SpecHeadsError(f"student state does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        model.tie_weights()
        hyper_parameters = {
            "student": dataclasses.asdict(self.student_cfg),
            "architecture": type(model).__name__,
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "objective": {k: getattr(self.cfg, k) for k in ("loss", "temperature", "jsd_beta", "ce_weight", "on_policy_fraction")},
        }
        if training:
            hyper_parameters["training"] = training
        return save_draft_model(path, model, verifier, hyper_parameters, token_counts=self.token_counts)


def save_draft_model(path, model, verifier, hyper_parameters: dict, token_counts: torch.Tensor | None = None):
    """``save_pretrained`` + the verifier's tokenizer + the specheads block in config.json (+ the
    token ranking of the training answers, ``draft_vocab.json``), atomically."""

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        if verifier.tokenizer is not None:
            verifier.tokenizer.save_pretrained(tmp)
        config_path = tmp / CONFIG
        config = json.loads(config_path.read_text())
        config["specheads"] = {
            "format_version": FORMAT_VERSION,
            "drafter_kind": KIND,
            "hyper_parameters": hyper_parameters,
            "verifier": verifier_info(verifier),
        }
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        if token_counts is not None:
            write_ranking(tmp, token_counts, source="answer tokens of the training data")

    return atomic_directory(path, write)


class _AsVerifier:
    """The student seen through the two attributes ``data._generate_batch`` reads."""

    def __init__(self, model, verifier):
        self.model = model
        self.eos_token_ids = verifier.eos_token_ids
        self.device = next(model.parameters()).device


def _unwrap(module):
    return module.module if hasattr(module, "module") and not hasattr(module, "generate") else module


# -- the objective registry's entry points (specheads.training.objectives) -----------------
LOSSES = tuple(DIVERGENCES)  # fkl first: the default


def check_for_verifier(recipe, verifier) -> None:
    from ..student import check_student

    check_student(recipe.drafter.student, verifier)


def build(recipe, verifier, train_ds) -> DistillObjective:
    from ..draft_vocab import answer_token_counts

    return DistillObjective(verifier, recipe.drafter, recipe.objective, seed=recipe.training.seed,
                            trust_remote_code=recipe.verifier.trust_remote_code,
                            token_counts=answer_token_counts(train_ds, verifier.vocab_size))
