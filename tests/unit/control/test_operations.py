"""Runtime operations on the fake cluster (the real shards and routers, no Ray): experts
added and removed, replicas, pins, drains, scaling, rebalancing with each policy; bad input
refused with nothing changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymoe import (
    ConfigError,
    DTypeError,
    ExpertIdError,
    MoELayer,
    PoolSpec,
    ResourceLimitError,
    ShapeError,
)
from raymoe._private.control.controller import Controller
from raymoe._private.control.goal import Goal
from raymoe.errors import NonFiniteError
from raymoe.placement import POLICIES, contiguous
from raymoe.store import MemoryStore
from tests.helpers import spec_dict
from tests.unit.control.fakes import FakeCluster, close, run, setup, start


def _grown_reference(ctl, layer, extra: dict) -> MoELayer:
    """MoELayer of the controller's current spec holding ``layer``'s weights + ``extra`` rows."""
    ref = MoELayer(ctl.spec).eval()
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    for k, v in extra.items():
        if k == "router.keys":
            rows = v.shape[1]
            keys = torch.zeros(ref.state_dict()[k].shape)
            old = sd[k]
            keys[:, 0, : old.shape[2]] = old[:, 0]
            keys[:, 0, old.shape[2] : old.shape[2] + rows] = torch.as_tensor(v)
            keys[:, 1, : old.shape[2]] = old[:, 1]
            sd[k] = keys
        else:
            sd[k] = torch.cat([sd[k], torch.as_tensor(v)])
    ref.load_state_dict(sd)
    return ref


def test_add_experts_with_weights_serves_them():
    ctl, _, layer, weights = setup()
    g = torch.Generator().manual_seed(3)
    extra = {
        "experts.w_gate": torch.randn(3, 24, 16, generator=g) * 0.2,
        "experts.w_up": torch.randn(3, 24, 16, generator=g) * 0.2,
        "experts.w_down": torch.randn(3, 16, 24, generator=g) * 0.2,
        "router.weight": torch.randn(3, 16, generator=g) * 3,
    }  # hot: they get chosen
    start(ctl, contiguous(8, 2), weights)
    report = run(ctl.add_experts(3, {k: v.numpy() for k, v in extra.items()}))
    assert report.expert_ids == (8, 9, 10) and ctl.spec.num_experts == 11
    assert all(r.table.num_experts == 11 and r.spec.num_experts == 11 for r in ctl.routers)
    x = torch.randn(40, 16)
    ref = _grown_reference(ctl, layer, extra)
    assert torch.isin(ref(x, return_info=True)[1].expert_ids, torch.tensor([8, 9, 10])).any()
    close(ctl, ref, x)
    assert Goal.load(ctl.store, ctl.spec.name).spec.num_experts == 11


def test_experts_added_without_weights_are_those_of_the_grown_layer():
    """No weights given: the new experts and their gate rows are exactly those that
    ``MoELayer`` of the grown spec draws (its old rows are the pool's, untouched)."""
    spec = PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2, "bias": True}, E=8), "shards": {"count": 2}}
    )
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    start(ctl, contiguous(8, 2), None)
    before = MoELayer(spec).eval()
    run(ctl.add_experts(4))
    grown = MoELayer(ctl.spec).eval()  # seeded: nothing copied from the pool
    sd = grown.state_dict()
    assert torch.equal(sd["router.weight"][:8], before.router.weight)  # old rows unchanged
    assert torch.equal(sd["router.bias"][:8], before.router.bias)
    x = torch.randn(60, 16)
    assert torch.isin(grown(x, return_info=True)[1].expert_ids, torch.arange(8, 12)).any()
    close(ctl, grown, x)


def test_product_key_pool_grows_by_whole_rows():
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "product_key", "heads": 2, "k": 2, "d_key": 8}, E=16, kind="peer"),
            "shards": {"count": 2},
        }
    )
    layer = MoELayer(spec).eval()
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    weights = {k: v.numpy() for k, v in layer.state_dict().items()}
    start(ctl, contiguous(16, 2, align=4), weights)
    g = torch.Generator().manual_seed(1)
    extra = {
        "experts.u": torch.randn(8, 16, generator=g),
        "experts.v": torch.randn(8, 16, generator=g),
        "router.keys": torch.randn(2, 2, 4, generator=g) * 2,
    }
    with pytest.raises(ConfigError, match="whole sub-key rows of 4"):
        run(ctl.add_experts(6))
    run(ctl.add_experts(8, {k: v.numpy() for k, v in extra.items()}))
    assert ctl.spec.routing.grid(24) == (6, 4)
    shard_of = ctl.placement.primary()[0]  # each new row landed whole on one shard
    assert len(set(shard_of[16:20].tolist())) == 1 and len(set(shard_of[20:24].tolist())) == 1
    close(ctl, _grown_reference(ctl, layer, extra), torch.randn(50, 16))


def test_remove_experts_stops_routing_to_them_and_frees_their_places():
    ctl, _, layer, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    report = run(ctl.remove_experts([2, 5]))
    assert report.removed == (2, 5) and report.replicas_dropped == 2
    assert ctl.placement.replicas()[[2, 5]].tolist() == [0, 0]
    assert sum(s.status()["experts"] for s in ctl.shards) == 6  # their places were freed
    ref = MoELayer(ctl.spec).eval()
    ref.load_state_dict(layer.state_dict())
    close(ctl, ref, torch.randn(30, 16))
    run(ctl.rebalance(policy_name="eplb"))  # a rebalance never gives them a replica back
    assert ctl.placement.replicas()[[2, 5]].tolist() == [0, 0]
    close(ctl, ref, torch.randn(30, 16))


BAD = [
    ("remove_experts", ([8],), ExpertIdError, "not in"),
    ("remove_experts", ([],), ConfigError, "at least one"),
    ("remove_experts", (list(range(7)),), ConfigError, "live experts"),  # k=2 needs 2
    ("remove_experts", ([1.5],), DTypeError, "integers"),
    ("add_experts", (0,), ConfigError, "count"),
    ("add_experts", (2, {"experts.w_up": np.zeros((2, 24, 16), np.float32)}), ConfigError,
     "missing"),
    ("add_experts", (2, {"router.weight": np.zeros((3, 16), np.float32)}), ShapeError, "shape"),
    ("add_experts", (2, {"router.weight": np.full((2, 16), np.nan, np.float32)}),
     NonFiniteError, "NaN"),
    ("add_experts", (2, {"router.nope": np.zeros((2, 16), np.float32)}), ConfigError, "unknown"),
    ("replicate", (8, 2), ExpertIdError, "not in"),
    ("replicate", (0, 0), ConfigError, "replicas"),
    ("replicate", (0, 3), ConfigError, "replicas"),
    ("scale_shards", (0,), ConfigError, "shards"),
    ("scale_shards", (9,), ConfigError, "shards"),
    ("drain_shard", (5,), ConfigError, "shard"),
    ("rebalance", (False, "nope"), ConfigError, "policy"),
]  # fmt: skip


@pytest.mark.parametrize("op,args,error,match", BAD, ids=[f"{b[0]}-{i}" for i, b in
                                                          enumerate(BAD)])  # fmt: skip
def test_bad_operations_are_refused_and_change_nothing(op, args, error, match):
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    before = (ctl.describe(), ctl.goal.to_bytes())
    with pytest.raises(error, match=match):
        run(getattr(ctl, op)(*args))
    assert (ctl.describe(), ctl.goal.to_bytes()) == before


def test_removed_experts_stay_removed():
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    run(ctl.remove_experts([3]))
    for op, args in [("remove_experts", ([3],)), ("replicate", (3, 2)), ("pin", (3, 1))]:
        with pytest.raises(ExpertIdError, match="removed"):
            run(getattr(ctl, op)(*args))


def test_growth_and_removal_a_kind_cannot_route_say_so():
    routing = {"kind": "hierarchical", "n_groups": 2, "k_groups": 1, "k": 2}
    spec = PoolSpec.from_dict({**spec_dict(routing, E=8), "shards": {"count": 2}})
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    start(ctl, contiguous(8, 2), None)
    v = ctl.placement.version
    with pytest.raises(ConfigError, match="whole groups of 4 experts"):
        run(ctl.add_experts(2))
    with pytest.raises(ConfigError, match="fewer than k=2 live experts"):
        run(ctl.remove_experts([1, 2, 3]))
    assert ctl.placement.version == v and ctl.spec == spec


def test_pins_are_the_spec_and_every_plan_keeps_them():
    ctl, _, layer, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    report = run(ctl.pin(5, 2))
    assert report.pinned == {5: 2} and ctl.spec.shards.replicas == {5: 2}
    assert Goal.load(ctl.store, ctl.spec.name).spec.pins == {5: 2}  # one source of truth
    for name in POLICIES:
        run(ctl.rebalance(policy_name=name))
        assert ctl.placement.replicas()[5] == 2, name
    assert run(ctl.unpin(5)).pinned == {} and ctl.spec.pins == {}
    close(ctl, layer, torch.randn(20, 16))


def test_drain_and_scale_move_replicas_and_keep_serving():
    ctl, _, layer, weights = setup(E=16, shards=3)
    start(ctl, contiguous(16, 3), weights)
    run(ctl.drain_shard(0))
    assert ctl.describe().experts_per_shard[0] == 0 and ctl.describe().drained == (0,)
    close(ctl, layer, torch.randn(20, 16))
    run(ctl.scale_shards(5))
    d = ctl.describe()
    assert d.shards == 5 and min(d.experts_per_shard) > 0 and d.drained == ()
    run(ctl.scale_shards(2))
    assert ctl.describe().shards == 2 and ctl.spec.shards.count == 2
    close(ctl, layer, torch.randn(20, 16))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_rebalance_with_each_policy_follows_the_load(policy):
    ctl, _, layer, weights = setup(E=16, shards=4)
    start(ctl, contiguous(16, 4), weights)
    ctl.load.load = np.ones(16)
    ctl.load.load[:4] = 40  # a hot set on shard 0
    dry = run(ctl.rebalance(dry_run=True, policy_name=policy))
    assert dry.dry_run and dry.version == 1 and ctl.placement.version == 1
    assert dry.imbalance_after < dry.imbalance_before
    report = run(ctl.rebalance(policy_name=policy))
    assert report.version == ctl.placement.version == 2 and report.policy == policy
    assert report.imbalance_after == pytest.approx(ctl.imbalance())
    close(ctl, layer, torch.randn(20, 16))


def test_admin_changes_past_the_memory_budget_or_max_shards_are_refused():
    """An admin call cannot ask for more memory than the pool may hold (its
    ``limits.max_pool_bytes``, or 80% of what the nodes report) nor more shards than
    ``control.max_shards``: a typed refusal, and nothing changes."""
    ctl, cluster, layer, weights = setup(shards=2)
    start(ctl, contiguous(8, 2), weights)
    before = (ctl.placement.version, ctl.spec)
    cluster.memory = int(9.5 * ctl.expert_bytes / 0.8)  # room for 9 replicas
    with pytest.raises(ResourceLimitError, match="80% of the cluster's memory"):
        run(ctl.add_experts(3))
    run(ctl.replicate(1, 2))  # 9 replicas: within it
    with pytest.raises(ResourceLimitError, match="memory budget"):
        run(ctl.pin(2, 2))
    cluster.memory = 1 << 34
    ctl.goal = ctl.goal.replace(
        spec=ctl.spec.model_copy(
            update={
                "limits": ctl.spec.limits.model_copy(
                    update={"max_pool_bytes": 9 * ctl.expert_bytes}
                )
            }
        )
    )
    with pytest.raises(ResourceLimitError, match=r"limits\.max_pool_bytes"):
        run(ctl.add_experts(1))
    ctl.goal = ctl.goal.replace(
        spec=ctl.spec.model_copy(
            update={"control": ctl.spec.control.model_copy(update={"max_shards": 3})}
        )
    )
    with pytest.raises(ResourceLimitError, match="max_shards"):
        run(ctl.scale_shards(4))
    assert ctl.placement.version == before[0] + 1 and ctl.spec.num_experts == 8
    assert ctl.spec.pins == {} and len(ctl.shards) == 2
    close(ctl, layer, torch.randn(9, 16))
