"""``verifier.shard``: the frozen verifier's decoder layers sharded across the training processes
(FSDP2 or DeepSpeed ZeRO-3), its features computed online through the sharded forward.

On two gloo processes under ``accelerate launch`` (one launch, several runs in it): the sharded
verifier's hidden states and logits equal the whole verifier's; each process holds about half of
its layers; EAGLE-3 trained on online features from a sharded verifier (fsdp, zero3, and fsdp with
the feature cache filled and read through it) and Medusa (fsdp, the verifier passed in whole and
sharded in place) give the losses and weights of the unsharded two-process run; transformers'
generate is refused with a pointer to the serving engines. Without processes: the recipe
refusals, the one-process no-op, and the 8-GPU accelerate configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model
from specheads.errors import SpecHeadsError
from specheads.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import accelerate
# Several runs in these two processes: the process group outlives each run (end_training would end it).
accelerate.Accelerator.end_training = lambda self: [t.finish() for t in self.trackers]
from accelerate import Accelerator
from specheads.errors import SpecHeadsError
from specheads.training.loop import train
from specheads.training.recipe import VerifierSection
from specheads.training.sharded_verifier import all_agree, load_sharded_verifier, sharded
from specheads.verifier import load_verifier
from test_eagle3_training import datasets, recipe
from conftest import cached_verifier

import specheads.training.features as features
reads = []  # feature-store reads: a sharded run with the cache reads its second epoch back
get = features.FeatureStore.get
features.FeatureStore.get = lambda self, *a, **k: reads.append(1) or get(self, *a, **k)

folder, out = {folder!r}, {out!r}
acc = Accelerator()
rank = acc.process_index
result = {{"rank": rank}}
whole = load_verifier(folder, dtype="float32", float32_head=False)
ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(rank))  # each process its own batch
with torch.no_grad():
    ref = whole.model(input_ids=ids, output_hidden_states=True)
for mode in ("fsdp", "zero3"):
    v = load_sharded_verifier(VerifierSection(name=folder, dtype="float32", shard=mode), acc)
    with torch.no_grad():
        got = v.model(input_ids=ids, output_hidden_states=True)
    info = sharded(v.model)
    result[mode] = {{
        "logits": (got.logits - ref.logits).abs().max().item(),
        "hidden": max((a - b).abs().max().item() for a, b in zip(got.hidden_states, ref.hidden_states)),
        "held": info.held_bytes, "whole": info.whole_bytes, "unsharded": info.unsharded_bytes,
        "fingerprint": v.fingerprint() == whole.fingerprint(),
        "agree_mixed": all_agree(v.model, rank == 0), "agree_all": all_agree(v.model, True),
    }}
    try:
        v.model.generate(input_ids=ids[:1], max_new_tokens=2)
        result[mode]["generate"] = "ran"
    except SpecHeadsError as exc:
        result[mode]["generate"] = str(exc)

common = ("verifier.dtype=float32", "training.max_steps=6", "training.save_every=100", "training.eval_every=3")
runs = {{
    "eagle3-none": ("verifier.shard=none", "training.cache_hidden_states=false"),
    "eagle3-fsdp": ("verifier.shard=fsdp", "training.cache_hidden_states=false"),
    "eagle3-zero3": ("verifier.shard=zero3", "training.cache_hidden_states=false"),
    "eagle3-fsdp-cache": ("verifier.shard=fsdp", "training.cache_hidden_states=true"),
}}
for name, extra in runs.items():
    reads.clear()
    train(recipe(f"{{out}}/{{name}}", f"verifier.name={{folder}}", *common, *extra), datasets=datasets(), progress=False)
    result[f"reads-{{name}}"] = len(reads)
for shard in ("none", "fsdp"):  # Medusa, the verifier passed in whole (sharded in place)
    r = recipe(f"{{out}}/medusa-{{shard}}", *common, f"verifier.shard={{shard}}", "drafter.kind=medusa", "drafter.num_heads=3",
               "drafter.aux_layer_ids=null", "objective.ttt_steps=7", "drafter.draft_vocab_size=null", "objective.loss=kl",
               "training.cache_hidden_states=false")
    train(r, verifier=load_verifier(folder, dtype="float32", float32_head=False), datasets=datasets(), progress=False)
with open(f"{{out}}/result-{{rank}}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
def test_sharded_verifier_on_two_processes_matches_the_whole_one(tmp_path):
    from specheads.checkpoint import load_drafter_state
    from specheads.model_id import weights_sha256

    folder = tmp_path / "verifier"
    make_model("llama").save_pretrained(folder, safe_serialization=True)  # the verifier the EAGLE-3 test data came from
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=tests, folder=str(folder), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", str(script)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result-{rank}.json").read_text())
        for mode in ("fsdp", "zero3"):
            r = result[mode]
            assert r["logits"] <= 1e-6 and r["hidden"] <= 1e-6, (rank, mode, r)
            assert r["fingerprint"]
            assert r["agree_mixed"] is False and r["agree_all"] is True  # one process's "no" is everyone's
            # each process holds the whole non-layer tensors and about half of every layer
            layers = r["whole"] - r["unsharded"]
            assert r["held"] < r["unsharded"] + 0.6 * layers, (rank, mode, r)
            assert "data.self_distill.engine" in r["generate"] and f"verifier.shard={mode}" in r["generate"]
        # 3 steps an epoch, an evaluation every 3: the second epoch and the second evaluation read
        # the feature store, on both processes alike (a sharded forward is all or none)
        assert result["reads-eagle3-fsdp-cache"] == 4 and result["reads-eagle3-fsdp"] == 0, result

    def run(name):
        summary = json.loads((tmp_path / name / "training_summary.json").read_text())
        losses = [h["loss"] for h in summary["history"] if "loss" in h]
        evals = [h for h in summary["history"] if any(k.startswith("eval/") for k in h)]
        return losses, evals, load_drafter_state(tmp_path / name / "drafter")[1]

    for base, others in (("eagle3-none", ("eagle3-fsdp", "eagle3-zero3", "eagle3-fsdp-cache")), ("medusa-none", ("medusa-fsdp",))):
        loss0, eval0, w0 = run(base)
        assert len(loss0) == 6 and loss0[-1] < loss0[0], loss0
        for name in others:
            loss, evals, w = run(name)
            torch.testing.assert_close(torch.tensor(loss), torch.tensor(loss0), atol=1e-5, rtol=0, msg=name)
            assert len(evals) == len(eval0) == 2
            for a, b in zip(evals, eval0):
                assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a), (name, a, b)
            assert w.keys() == w0.keys()
            for key in w0:
                torch.testing.assert_close(w[key], w0[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")
    # the features a sharded run stored name the whole verifier (its weights hash, taken before sharding)
    stores = list((tmp_path / "eagle3-fsdp-cache" / "hidden_cache").iterdir())
    assert len(stores) == 1
    assert json.loads((stores[0] / "meta.json").read_text())["verifier"]["weights_sha256"] == weights_sha256(make_model("llama"))


# -- without processes ----------------------------------------------------------------------------
def _recipe(tmp_path, *overrides):
    return load_recipe(None, [f"training.output_dir={tmp_path}", "data.conversations=x.jsonl", *overrides])


@pytest.mark.parametrize("overrides, named", [
    (["verifier.shard=fsdp2"], "verifier.shard='fsdp2'"),
    (["verifier.shard=zero3", "training.lora={r: 4}"], "training.lora"),
    (["verifier.shard=fsdp", "drafter.kind=draft_model"], "drafter.kind=draft_model"),
])
def test_shard_combinations_that_cannot_work_are_refused(tmp_path, overrides, named):
    with pytest.raises(SpecHeadsError, match=named.replace("[", r"\[")):
        _recipe(tmp_path, *overrides)


def test_shard_with_the_feature_cache_or_medusa_is_accepted(tmp_path):
    assert _recipe(tmp_path, "verifier.shard=fsdp", "training.cache_hidden_states=true").verifier.shard == "fsdp"
    assert _recipe(tmp_path, "verifier.shard=zero3", "drafter.kind=eagle3").verifier.shard == "zero3"


def test_one_process_loads_whole_and_says_so_once(tmp_path, capsys):
    """On one process verifier.shard changes nothing: the verifier stays whole, said once."""
    from conftest import cached_verifier
    from test_eagle3_training import datasets, recipe

    from specheads.training.loop import train
    from specheads.training.sharded_verifier import sharded

    v = cached_verifier("llama")
    train(recipe(tmp_path / "run", "verifier.shard=fsdp", "training.max_steps=1", "training.cache_hidden_states=false"),
          verifier=v, datasets=datasets(), progress=True)
    out = capsys.readouterr().out
    assert out.count("verifier.shard fsdp: one process, so the verifier is loaded whole") == 1
    assert sharded(v.model) is None and all(type(p) is torch.nn.Parameter for p in v.model.parameters())


def test_decoder_layers_are_found_across_architectures():
    from specheads.training.sharded_verifier import decoder_layers

    for arch, path in (("llama", "model.layers"), ("qwen2", "model.layers"), ("gpt2", "transformer.h")):
        model = make_model(arch, layers=3)
        assert decoder_layers(model) is model.get_submodule(path)


@pytest.mark.parametrize("name", ["fsdp_8gpu.yaml", "deepspeed_zero3_8gpu.yaml"])
def test_8gpu_accelerate_configs_parse(name):
    """The 8-GPU launch configs load as accelerate configs: 8 processes, bf16, the backend named."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "recipes" / "accelerate" / name
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes == 8 and cfg.num_machines == 1 and cfg.mixed_precision == "bf16"
    text = path.read_text()
    assert "accelerate launch --config_file recipes/accelerate/" + name in text and "verifier.shard" in text
    if name.startswith("fsdp"):
        assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
    else:
        assert cfg.distributed_type == "DEEPSPEED" and cfg.deepspeed_config["zero_stage"] == 3
