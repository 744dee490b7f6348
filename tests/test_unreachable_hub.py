"""A verifier hub id that cannot be reached (no network, or HF_HUB_OFFLINE) fails at once with one
SpecHeadsError that names the id and says how to point at a local copy, instead of transformers
retrying every file for minutes; a copy in the local Hugging Face cache still loads. No test here
touches the network: the hub is off (HF_HUB_OFFLINE=1) or its probe is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from specheads.errors import SpecHeadsError

HUB_ID = "meta-llama/Llama-3.1-8B-Instruct"

SCRIPT = r"""
import json, sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import make_model
from specheads.errors import SpecHeadsError
from specheads.verifier import load_verifier

out = {{}}
start = time.perf_counter()
try:
    load_verifier({hub_id!r})
    out["missing"] = "loaded"
except SpecHeadsError as exc:
    out["missing"] = str(exc)
out["missing_seconds"] = time.perf_counter() - start
v = load_verifier("tiny-org/tiny-llama", dtype="float32")  # in the cache: loads without the hub
ids = torch.tensor([[3, 4, 5, 6]])
out["cached_equal"] = torch.equal(v.model(ids).logits, make_model("llama").eval()(ids).logits)
print("RESULT " + json.dumps(out))
"""


def _fake_hub_cache(home, repo_id: str) -> None:
    """``repo_id`` in a Hugging Face cache under ``home`` (HF_HOME), laid out as a download leaves it."""
    from conftest import make_model

    commit = "0" * 40
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    make_model("llama").save_pretrained(repo / "snapshots" / commit, safe_serialization=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_offline_hub_id_is_refused_at_once_and_a_cached_copy_loads(tmp_path):
    home = tmp_path / "hf"
    _fake_hub_cache(home, "tiny-org/tiny-llama")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), hub_id=HUB_ID))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    msg = out["missing"]
    assert HUB_ID in msg and "HF_HUB_OFFLINE is set" in msg, msg
    assert "--local-dir DIR" in msg and "verifier.name" in msg and "HF_HOME" in msg, msg
    assert str(home / "hub") in msg  # the cache it looked in
    assert out["missing_seconds"] < 5, out
    assert out["cached_equal"] is True


def test_unanswering_hub_is_refused_at_once(tmp_path, monkeypatch):
    """No network (the hub's probe gets no answer) and no cached copy: the same error, without
    the minutes of retries transformers would spend on every file."""
    import huggingface_hub.constants as hub_constants

    import specheads.verifier as verifier_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    probes = []
    monkeypatch.setattr(verifier_module, "_hub_answers", lambda timeout: probes.append(timeout) or False)
    start = time.perf_counter()
    with pytest.raises(SpecHeadsError) as info:
        verifier_module.load_verifier(HUB_ID)
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert probes == [verifier_module.HUB_PROBE_SECONDS]
    assert HUB_ID in msg and "did not answer within 5 s" in msg and "--local-dir DIR" in msg and "HF_HUB_OFFLINE=1" in msg, msg


def test_names_that_are_no_hub_id_keep_their_own_error(monkeypatch):
    """A name that cannot be a hub id is not probed: the load's own error names it."""
    import specheads.verifier as verifier_module

    monkeypatch.setattr(verifier_module, "_hub_answers", lambda timeout: pytest.fail("probed the hub"))
    with pytest.raises(SpecHeadsError, match="unknown verifier 'not a model'"):
        verifier_module.load_verifier("not a model")
