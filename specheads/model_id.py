"""What identifies a model's weights: the hashes drafter checkpoints, feature stores and
per-machine measurements record to recognise the verifier they were made for."""

from __future__ import annotations

import hashlib

import torch

# Set on a model whose weights are sharded across processes (training.sharded_verifier): the
# weights_sha256 of its whole weights, taken before sharding, as no process holds them all since.
WHOLE_WEIGHTS_SHA256 = "_specheads_weights_sha256"


def fingerprint(model) -> dict:
    """What a drafter checkpoint records to recognise the verifier it was trained for.

    The hash covers a strided sample of LM-head rows rounded to bfloat16, so it is stable across
    the float32 / bfloat16 loads of one model but differs between models.
    """
    head = model.get_output_embeddings().weight.detach()
    rows = head[:: max(1, head.shape[0] // 64)][:64].to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {"vocab_size": int(head.shape[0]), "hidden_size": int(head.shape[1]), "lm_head_sha256": digest}


def weights_sha256(model, row_elements: int = 8192) -> str:
    """A hash of a cheap, deterministic sample of every parameter tensor: its shape and its first
    and last rows (last dimension, at most ``row_elements`` values each), rounded to bfloat16.

    ``fingerprint`` hashes the LM head alone, which a Medusa-2 run leaves untouched (LoRA adapts
    the attention and MLP layers), so it cannot tell the adapted verifier from its base model; a
    merged LoRA update changes every row of the layers it targets, so this does. It reads a few
    rows per tensor, so it costs milliseconds for a 135M model on a CPU and stays small for
    multi-GB models on a GPU (one transfer per device).
    """
    if WHOLE_WEIGHTS_SHA256 in getattr(model, "__dict__", {}):
        return model.__dict__[WHOLE_WEIGHTS_SHA256]
    digest = hashlib.sha256()
    samples: list[torch.Tensor] = []
    for param in model.parameters():  # tied weights once, in a fixed order
        t = param.detach()
        digest.update(repr(tuple(t.shape)).encode())
        if t.numel() == 0 or t.device.type == "meta":  # partitioned or offloaded: only its shape is known here
            continue
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        samples += [rows[0, :row_elements], rows[-1, -row_elements:]]
    # bfloat16, as in fingerprint(): float32 and bfloat16 loads of one model hash alike.
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for s in samples:
        by_device.setdefault(s.device, []).append(s)
    moved = {dev: iter(torch.cat([x.to(torch.bfloat16) for x in group]).cpu().split([x.numel() for x in group]))
             for dev, group in by_device.items()}
    for s in samples:
        digest.update(next(moved[s.device]).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
