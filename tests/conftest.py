"""Shared fixtures: tiny random causal LMs of three architectures, wrapped as Verifiers.

Every model here is built in the test process from a fixed seed (no downloads): vocabulary 64,
hidden size 32, 2 layers. A large ``initializer_range`` makes the random logits far from uniform,
so greedy continuations vary (and argmax ties, which would make float noise matter, are rare).

``make_model`` also builds two mixture-of-experts families that the parametrised fixtures leave
out (``MOE_ARCHS``: Qwen3-MoE, and gpt-oss with sliding-window and full layers alternating and
attention sinks); ``moe_verifier`` shares them at 4 layers (tests/test_moe_verifiers.py).

Tests that load the real SmolLM2 verifier are marked ``@pytest.mark.slow`` (the marker is
registered in pyproject.toml); run them with ``pytest -m slow``.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch

from specheads.verifier import Verifier

ARCHS = ("llama", "qwen2", "gpt2")
# Not in ARCHS (whose fixture parametrises many tests): tests/test_moe_verifiers.py runs these.
MOE_ARCHS = ("qwen3_moe", "gpt_oss")
MOE_WINDOW = 16  # gpt-oss's sliding window in the tiny twin: test sequences run past it
VOCAB = 64
BOS, EOS, PAD = 0, 1, 2
MAX_POSITIONS = 256

# Per-machine measurements (verify cost, CPU linears) go to a store of this test session, never the
# user's: a test's timings under load must not size anyone's trees. The converted verifiers are
# shared through a link, so the real SmolLM2 is converted once per machine, not per session.
_USER_CACHE = Path(os.environ.get("SPECHEADS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specheads")
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="specheads-tests-"))
(_USER_CACHE / "verifiers").mkdir(parents=True, exist_ok=True)
(_SESSION_CACHE / "verifiers").symlink_to(_USER_CACHE / "verifiers", target_is_directory=True)
os.environ["SPECHEADS_CACHE"] = str(_SESSION_CACHE)

# The models are tiny: one intra-op thread avoids thread contention that makes each forward
# several times slower on a small shared machine.
torch.set_num_threads(1)


def make_model(
    arch: str,
    *,
    seed: int = 0,
    vocab: int = VOCAB,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = MAX_POSITIONS,
    init_range: float = 0.5,
    experts: int = 4,
    top_k: int = 2,
    window: int = MOE_WINDOW,
):
    """A tiny randomly initialised causal LM (float32, eval mode, no grads). ``experts``, ``top_k``
    and ``window`` shape the MoE families (``window``: gpt-oss's sliding layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions, initializer_range=init_range, **ids,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions, initializer_range=init_range, **ids,
        )
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
            initializer_range=init_range, **ids,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        # Every layer sparse (decoder_sparse_step 1): top-k of `experts` experts, renormalised, and
        # heads x head_dim twice the hidden size, as in Qwen3-30B-A3B (32 x 128 over 2048).
        cfg = Qwen3MoeConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
            num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            head_dim=2 * hidden // heads, max_position_embeddings=max_positions, initializer_range=init_range, **ids,
        )
        model = Qwen3MoeForCausalLM(cfg)
    elif arch == "gpt_oss":
        from transformers import GptOssConfig, GptOssForCausalLM

        # Plain float32 weights (no MXFP4), sliding and full layers alternating, attention sinks,
        # heads x head_dim wider than the hidden size (gpt-oss-20b: 64 x 64 over 2880) and its YaRN
        # rope scaled the same way (factor x original context = the context).
        cfg = GptOssConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_local_experts=experts,
            num_experts_per_tok=top_k, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), head_dim=2 * hidden // heads, sliding_window=window,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            max_position_embeddings=max_positions, initializer_range=init_range,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": max_positions // 4},
            **ids,
        )
        model = GptOssForCausalLM(cfg)
    else:
        raise ValueError(f"unknown test architecture {arch!r}")
    model.eval()
    model.requires_grad_(False)
    return model


def make_verifier(arch: str, **kwargs) -> Verifier:
    """A Verifier (no tokenizer) around a fresh tiny model."""
    model = make_model(arch, **kwargs)
    return Verifier(model=model, tokenizer=None, name=f"tiny-{arch}-seed{kwargs.get('seed', 0)}")


@functools.lru_cache(maxsize=None)
def cached_verifier(arch: str, seed: int = 0) -> Verifier:
    """One shared Verifier per (arch, seed): the models are only ever run in inference mode."""
    return make_verifier(arch, seed=seed)


@functools.lru_cache(maxsize=None)
def moe_verifier(arch: str, seed: int = 0) -> Verifier:
    """One shared tiny MoE Verifier per (arch, seed), 4 layers deep (gpt-oss: sliding, full, sliding, full)."""
    return make_verifier(arch, seed=seed, layers=4)


def random_medusa_heads(verifier: Verifier, num_heads: int):
    """Medusa heads with seeded random residual blocks (std 0.2) and LM heads copied from the
    verifier's: drafts that are sometimes right, so lossless tests see accepts and rejects."""
    from specheads.drafters.medusa import MedusaConfig, MedusaHeads

    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(hidden_size=verifier.hidden_size, vocab_size=VOCAB, num_heads=num_heads))
    with torch.no_grad():
        for block in heads.blocks:
            for layer in block["layers"]:
                layer.weight.normal_(0, 0.2)
    heads.init_lm_heads_from(verifier.model.get_output_embeddings().weight)
    return heads


def noisy_copy(model, rel_sigma: float = 0.05, seed: int = 123):
    """The verifier with Gaussian noise on its weight matrices: a draft model that is often right."""
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * rel_sigma * p.std())
    return noisy


@functools.lru_cache(maxsize=None)
def noisy_model(arch: str):
    return noisy_copy(cached_verifier(arch, 0).model)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id) -> list[int]:
    """The new tokens of transformers' own greedy ``generate`` (the reference output)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=PAD,
    )
    return out[0, len(prompt):].tolist()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def verifier(arch) -> Verifier:
    """The shared tiny verifier of the parametrised architecture (seed 0)."""
    return cached_verifier(arch, 0)


@pytest.fixture
def other_model(arch):
    """A different random model of the same architecture and vocabulary: a mostly-wrong draft model."""
    return cached_verifier(arch, 1).model


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct verifier (converted from its GGUF once, then cached)."""
    from specheads.verifier import load_verifier

    return load_verifier("smollm2-135m")


# Repetitive prompts, so the n-gram drafter finds matches to draft from.
REPETITIVE_PROMPTS = (
    (5, 9, 13, 5, 9, 13, 5, 9),
    (20, 21, 22, 23, 20, 21, 22, 23, 20, 21),
    (7, 30, 7, 31, 7, 30, 7, 31, 7, 30, 7),
)


@functools.lru_cache(maxsize=None)
def greedy_reference(arch: str, prompt: tuple[int, ...], max_new_tokens: int, eos: int) -> tuple[int, ...]:
    """Hugging Face greedy output of the cached tiny verifier (cached across tests)."""
    return tuple(hf_greedy(cached_verifier(arch).model, list(prompt), max_new_tokens, eos))


class FakeMachine:
    """A machine whose forwards cost what the test says: a clock that a model's forwards advance by
    ``true_ms(q)`` (q = the forward's token count) times ``slowdown``, with Gaussian noise of
    relative size ``noise``, a forward ``outlier`` times slower with probability ``outliers``, and
    ``drift`` multiplying the slowdown after each forward. The process gets ``cpu_share`` of the
    wall time as CPU time; ``load`` is the 1-minute load average it reports. Pass ``timing()`` to
    the measurement under test and ``attach(model)`` the model it times."""

    def __init__(self, true_ms, *, noise=0.0, outliers=0.0, outlier=4.0, drift=1.0, cpu_share=1.0, load=0.1, seed=0):
        import random

        self.true_ms, self.noise, self.outliers, self.outlier = true_ms, noise, outliers, outlier
        self.drift, self.cpu_share, self.load_value = drift, cpu_share, load
        self.slowdown, self.now, self.cpu, self.forwards = 1.0, 0.0, 0.0, 0
        self.rng = random.Random(seed)

    def clock(self) -> float:
        return self.now

    def cpu_clock(self) -> float:
        return self.cpu

    def load(self) -> float:
        return self.load_value

    def timing(self) -> dict:
        return {"timer": self.clock, "clock": self.clock, "load": self.load, "cpu_clock": self.cpu_clock}

    def attach(self, model):
        def advance(module, args, kwargs):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.forwards += 1
            ms = self.true_ms(ids.shape[-1]) * self.slowdown * max(0.05, 1 + self.rng.gauss(0, self.noise))
            if self.rng.random() < self.outliers:
                ms *= self.outlier
            self.slowdown *= self.drift
            self.now += ms / 1e3
            self.cpu += ms / 1e3 * self.cpu_share * torch.get_num_threads()

        return model.register_forward_pre_hook(advance, with_kwargs=True)
