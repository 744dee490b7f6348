"""An EAGLE-3 drafter sharded by FSDP2 (what recipes/accelerate/fsdp_8gpu.yaml does to it) trains
exactly as the unsharded one: its loss calls ``ttt_forward`` and ``logits`` instead of forward, and
FSDP2 gathers the weights around them only once the loop registers them. A one-process gloo group
is enough to shard (its parameters become DTensors); kinds that call their parts directly are
refused under FSDP with the routes that work."""

from __future__ import annotations

import copy
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from specheads.errors import SpecHeadsError
from specheads.training.loop import _register_fsdp_methods
from specheads.training.objectives.eagle3 import Eagle3Objective
from specheads.verifier import Verifier

from conftest import make_model


@pytest.fixture
def process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _objective():
    verifier = Verifier(model=make_model("llama", layers=4), tokenizer=None, name="tiny")
    token_map = torch.arange(0, 64, 2)  # a 32-token draft vocabulary
    return Eagle3Objective(verifier, SimpleNamespace(aux_layer_ids=None, num_layers=1),
                           SimpleNamespace(ttt_steps=3, ttt_decay=0.8), token_map)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 24), generator=g)
    answer = torch.zeros_like(ids)
    answer[:, 8:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_mask": answer}


def test_fsdp2_sharded_eagle3_drafter_trains_as_the_whole_one(process_group):
    from torch.distributed.fsdp import fully_shard

    objective = _objective()
    whole = copy.deepcopy(objective.module)
    loss, _ = objective.loss(whole, _batch())
    loss.backward()

    sharded = fully_shard(copy.deepcopy(objective.module))
    with pytest.raises(Exception, match="DTensor"):  # unregistered: the loss reads sharded weights
        objective.loss(sharded, _batch())
    _register_fsdp_methods(sharded, objective, "eagle3")
    loss_sharded, _ = objective.loss(sharded, _batch())
    loss_sharded.backward()
    assert float(loss_sharded.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    for (name, p), q in zip(whole.named_parameters(), sharded.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert torch.allclose(p.grad, q.grad.full_tensor(), atol=1e-6), name


def test_fsdp2_refuses_a_kind_that_calls_its_parts_directly(process_group):
    from torch.distributed.fsdp import fully_shard

    module = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(SpecHeadsError, match="drafter.kind=medusa cannot be trained under FSDP.*deepspeed_zero3_8gpu"):
        _register_fsdp_methods(module, SimpleNamespace(), "medusa")
    _register_fsdp_methods(torch.nn.Linear(2, 2), SimpleNamespace(), "medusa")  # not sharded: nothing to do
