"""ExpertOptimizer on in-process layers: it steps exactly the experts a forward reached,
keeps state for those rows only, accumulates over micro-batches, and carries its state
over to a grown layer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from raymoe import ConfigError, MoELayer, PoolSpec
from raymoe.optim import ExpertOptimizer
from tests.helpers import spec_dict

PEER = spec_dict(
    {"kind": "product_key", "heads": 2, "k": 3, "d_key": 8}, E=256 * 256, d=16, kind="peer"
)
FFN = spec_dict({"kind": "topk", "k": 2}, E=8, d=16)


def _touched(info) -> torch.Tensor:
    ids = info.expert_ids
    return torch.unique(ids[ids >= 0])


def test_peer_state_bytes_follow_the_rows_touched_not_the_experts():
    layer = MoELayer(PoolSpec.from_dict(PEER))
    opt = ExpertOptimizer(layer, "adam", lr=0.01)
    before = layer.experts.u.detach().clone()
    g = torch.Generator().manual_seed(0)
    reached = []
    for _ in range(2):  # two micro-batches, one step
        y, info = layer(torch.randn(32, 16, generator=g), return_info=True)
        y.square().sum().backward()
        reached.append(_touched(info))
    rows = torch.unique(torch.cat(reached))
    report = opt.step()
    assert report["experts"] == len(rows) == len(opt.state)
    per_row = 2 * 2 * 16 * 4 + 8  # exp_avg and exp_avg_sq of u and v rows, a step count
    dense = layer.spec.num_experts * per_row
    assert report["state_bytes"] == len(rows) * per_row < dense / 100
    moved = (layer.experts.u.detach() != before).any(1)
    assert torch.equal(torch.nonzero(moved).flatten(), rows)


def test_accumulation_equals_one_big_batch():
    spec = PoolSpec.from_dict(FFN)
    one, two = MoELayer(spec), MoELayer(spec)
    two.load_state_dict(one.state_dict())
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    opt_one, opt_two = ExpertOptimizer(one, "sgd", lr=0.1), ExpertOptimizer(two, "sgd", lr=0.1)
    one(x).square().sum().backward()
    for part in x.split(7):
        two(part).square().sum().backward()
    opt_one.step()
    opt_two.step()
    for a, b in zip(one.experts.parameters(), two.experts.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_no_grad_forwards_and_zero_grad_step_nothing():
    layer = MoELayer(PoolSpec.from_dict(FFN))
    opt = ExpertOptimizer(layer, "adamw", lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in layer.experts.parameters()]
    with torch.no_grad():
        layer(torch.randn(5, 16))
    layer(torch.randn(5, 16)).sum().backward()
    opt.zero_grad()
    assert opt.step()["experts"] == 0
    for a, b in zip(layer.experts.parameters(), before, strict=True):
        assert torch.equal(a, b)


def test_attach_carries_the_state_to_a_grown_layer():
    spec = PoolSpec.from_dict(FFN)
    layer = MoELayer(spec)
    opt = ExpertOptimizer(layer, "adam")
    layer(torch.randn(6, 16)).sum().backward()
    opt.step()
    held = opt.state.ids.clone()
    grown = MoELayer(spec.with_experts_added(2, 0))
    opt.attach(grown)
    opt.zero_grad()
    grown(torch.randn(6, 16)).sum().backward()
    opt.step()
    assert set(held.tolist()) <= set(opt.state.ids.tolist())
    with pytest.raises(ConfigError, match="no experts"):
        opt.attach(MoELayer(spec, experts=False))


def test_a_layer_and_its_optimizer_are_freed_without_the_cycle_collector():
    """The bank's forward hook holds the optimizer weakly: dropping both frees them at once
    (at 1M experts, GBs of weights and state), and the hook goes with the optimizer."""
    gc.disable()
    try:
        layer = MoELayer(PoolSpec.from_dict(FFN))
        opt = ExpertOptimizer(layer, "adam", lr=0.01)
        layer(torch.randn(4, 16, requires_grad=True)).sum().backward()
        opt.step()
        refs = weakref.ref(layer), weakref.ref(opt)
        hooks = layer.experts._forward_pre_hooks
        del opt
        assert refs[1]() is None and not hooks  # the optimizer, and its hook
        del layer
        assert refs[0]() is None
    finally:
        gc.enable()
