"""The direct path's pure parts: a small request routed and combined in the caller equals
``MoELayer`` (shards computed in process), a bad request is a miss that changes nothing, and
the traffic a view holds for a router is counted up, bounded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raymoe import MoELayer, PoolSpec
from raymoe._private import direct
from raymoe._private.data import direct_forward
from raymoe._private.data.direct_forward import Missed, Publication, Routed
from raymoe._private.data.dispatch import DispatchTable
from raymoe._private.data.gates import Gates
from raymoe._private.data.shard import ExpertShard
from raymoe.errors import PlacementMismatchError
from raymoe.placement import initial
from tests.helpers import spec_dict


class InProcess:
    """A blocking transport to shards computed in this process."""

    def __init__(self, shards: list[ExpertShard]):
        self.shards, self.sent = shards, 0

    def start(self, handle, x, local_ids, weights, digest, routing):
        self.sent += 1
        try:
            return self.shards[handle].compute(x, local_ids, weights, digest, None, routing)
        except Exception as e:
            return e

    def results(self, calls, timeout_s):
        for c in calls:
            if isinstance(c, Exception):
                raise c
        return calls


def _pool(routing: dict, shared=None):
    spec = PoolSpec.from_dict({**spec_dict(routing, E=8, shared=shared), "name": "p"})
    layer = MoELayer(spec).eval()
    placement = initial(spec.num_experts, 2, replicas={0: 2})
    shards = []
    for n in range(2):
        shard = ExpertShard(spec, n, placement.shard_experts(n))
        here = placement.shard_experts(n)
        rows = {
            k[8:]: v[torch.as_tensor(here)]
            for k, v in layer.state_dict().items()
            if k.startswith("experts.")
        }
        shard.configure(here, {k: v.numpy() for k, v in rows.items()})
        shards.append(shard)
    gates = Gates(spec, {k: v.numpy() for k, v in layer.state_dict().items()})
    now = Publication(spec, DispatchTable(placement), [0, 1], gates, 0)
    return layer, now, InProcess(shards)


@pytest.mark.parametrize(
    "routing,shared",
    [
        ({"kind": "topk", "k": 2, "renormalize": True}, {"hidden": 8, "gate": True}),
        ({"kind": "soft", "slots_per_expert": 2}, None),
    ],
)
def test_a_small_request_routed_and_combined_here_equals_the_layer(routing, shared):
    layer, now, calls = _pool(routing, shared)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    y, routed = direct_forward.forward(now, calls, x, None, None, None, 0, 1.0)
    with torch.no_grad():
        want = layer(x)
    assert y.shape == tuple(x.shape) and np.abs(y - want.numpy()).max() <= 1e-5
    assert routed.shard_pairs.sum() == len(routed.experts) > 0


def test_bad_input_and_a_refusal_are_misses_that_change_nothing():
    _, now, calls = _pool({"kind": "topk", "k": 2})
    with pytest.raises(Missed):
        direct_forward.forward(
            now, calls, torch.full((2, 16), float("nan")), None, None, None, 0, 1.0
        )
    with pytest.raises(Missed):
        direct_forward.forward(now, calls, torch.randn(2, 16), None, None, None, 3, 1.0)
    assert calls.sent == 0  # refused before any shard heard of it
    calls.shards[0].free(np.arange(2))  # places freed: the shard refuses, having done nothing
    with pytest.raises(Missed) as e:
        direct_forward.forward(now, calls, torch.randn(16, 16), None, None, None, 0, 1.0)
    assert isinstance(e.value.cause, PlacementMismatchError)

    class Unreachable(InProcess):
        def start(self, *args):
            raise TimeoutError("its endpoint did not answer")  # a shard restarting

    with pytest.raises(Missed) as e:
        direct_forward.forward(now, Unreachable([]), torch.randn(4, 16), None, None, None, 0, 1.0)
    assert isinstance(e.value.cause, TimeoutError)


def test_a_shard_fenced_at_a_newer_routing_version_refuses_older_gates():
    layer, now, calls = _pool({"kind": "topk", "k": 2})
    x = torch.randn(16, 16)
    direct_forward.forward(now, calls, x, None, None, None, 0, 1.0)  # version 0: served
    for shard in calls.shards:
        shard.fence(3)
        shard.fence(1)  # a fence never goes back
    with pytest.raises(Missed) as e:
        direct_forward.forward(now, calls, x, None, None, None, 0, 1.0)
    assert isinstance(e.value.cause, PlacementMismatchError) and "routing version 0" in str(
        e.value.cause
    )
    newer = dataclasses.replace(now, routing_version=3)
    y, _ = direct_forward.forward(newer, calls, x, None, None, None, 0, 1.0)
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_traffic_is_counted_up_per_expert_and_bounded(monkeypatch):
    monkeypatch.setattr(direct, "MAX_PENDING_PAIRS", 5)
    t = direct._Traffic()
    assert t.take() is None
    for ids, shard_pairs in (([1, 2, 2], [3]), ([2, 7, 7, 7], [1, 3]), ([1], [0, 1])):
        t.add(Routed(np.array(ids), np.array(shard_pairs), {}), (4, 16), 0.002)
    got = t.take()
    assert dict(zip(got["experts"].tolist(), got["pairs"].tolist(), strict=True)) == {
        1: 2,
        2: 3,
        7: 3,
    }
    assert got["shard_pairs"].tolist() == [4, 4] and got["latency_s"] == [(4, 0.002)] * 3
    assert t.take() is None
