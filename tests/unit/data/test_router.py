"""The router's batching, retries, deadlines and bounds, without Ray (in-process shards)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from raymoe import MoELayer, PoolSpec
from raymoe._private.data.router import Router
from raymoe._private.data.shard import ExpertShard
from raymoe._private.metrics import RecordingMetrics
from raymoe.errors import (
    DeadlineExceededError,
    PoolOverloadedError,
    ShapeError,
    ShardNotReadyError,
)
from raymoe.placement import contiguous, initial
from tests.helpers import spec_dict


class ShardDown(Exception):
    """What the fake transport raises for a shard that is down."""


class LocalShards:
    """ShardCalls over in-process ExpertShards; ``down[n]`` failures are injected first."""

    def __init__(self, spec, layer, placement, delay_s=0.0):
        self.shards = []
        state = {n: p.detach() for n, p in layer.experts.named_parameters()}
        for n in range(placement.num_shards):
            ids = placement.shard_experts(n)
            rows = {k: v[ids].numpy() for k, v in state.items()}
            self.shards.append(ExpertShard(spec, n, ids, rows=rows))
        self.handles = self.shards
        self.down = [0] * placement.num_shards
        self.calls = [0] * placement.num_shards
        self.delay_s = delay_s

    async def compute(self, shard, x, local_ids, weights, digest):
        self.calls[shard] += 1
        await asyncio.sleep(self.delay_s)
        if self.down[shard]:
            self.down[shard] -= 1
            raise ShardDown(f"shard {shard}")
        return self.shards[shard].compute(x, local_ids, weights, digest)

    def retryable(self, error):
        return isinstance(error, ShardDown | ShardNotReadyError)

    async def forget(self, shard):
        pass


def make(routing, *, E=8, shards=2, replicas=None, limits=None, delay_s=0.0, metrics=None, **kw):
    data = {**spec_dict(routing, E=E, **kw), "shards": {"count": shards}}
    if limits:
        data["limits"] = limits
    spec = PoolSpec.from_dict(data)
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    placement = initial(E, shards, replicas=replicas)
    transport = LocalShards(spec, layer, placement, delay_s)
    router = Router(spec, metrics)
    router.configure(
        transport,
        placement,
        {k: v.numpy() for k, v in layer.state_dict().items() if not k.startswith("experts.")},
    )
    return router, layer, transport


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(
    "routing",
    [
        {"kind": "topk", "k": 2},
        {"kind": "switch", "capacity_factor": 0.5},
        {"kind": "expert_choice", "k": 2},
    ],
    ids=["topk", "switch", "expert_choice"],
)
def test_32_concurrent_callers_are_batched_and_each_gets_its_own_rows(routing):
    router, layer, _ = make(routing, delay_s=0.002)
    xs = [torch.randn(1 + i % 7, 16, generator=torch.Generator().manual_seed(i)) for i in range(32)]

    async def main():
        return await asyncio.gather(*(router.forward(x.numpy()) for x in xs))

    outs = run(main())
    with torch.no_grad():
        for x, y in zip(xs, outs, strict=True):
            # batch-coupled gates (capacity, expert choice) see each request on its own
            assert np.abs(y - layer(x).numpy()).max() <= 1e-5
    st = router.stats()
    assert st["counters"]["batches"] < 32  # requests were coalesced
    assert max(st["batch_tokens"]) > 7  # a batch held more than one request


def test_max_batch_tokens_bounds_every_batch():
    router, _, _ = make({"kind": "topk", "k": 2}, limits={"max_batch_tokens": 10}, delay_s=0.002)

    async def main():
        return await asyncio.gather(
            *(router.forward(np.ones((4, 16), np.float32)) for _ in range(16))
        )

    run(main())
    assert max(router.stats()["batch_tokens"]) <= 10


def test_failed_sub_batch_goes_to_another_replica():
    router, layer, transport = make(
        {"kind": "topk", "k": 2}, shards=2, replicas={e: 2 for e in range(8)}
    )
    transport.down[1] = 1
    x = torch.randn(20, 16)
    y = run(router.forward(x.numpy()))
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5
    assert router.stats()["counters"]["retries"] == 1


def test_a_stale_placement_is_retried_on_another_replica_never_summed():
    router, layer, transport = make(
        {"kind": "topk", "k": 2}, shards=2, replicas={e: 2 for e in range(8)}
    )
    shard = transport.shards[1]
    moved = shard.expert_ids.roll(1).numpy()  # each place: another expert than the router means
    state = {n: p.detach() for n, p in layer.experts.named_parameters()}
    shard.configure(moved, rows={k: v[moved].numpy() for k, v in state.items()})
    x = torch.randn(20, 16)
    y = run(router.forward(x.numpy()))
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5
    assert shard.mismatches >= 1
    assert router.stats()["counters"]["retries"] == shard.mismatches


def test_failed_sub_batch_waits_for_its_only_replica():
    router, layer, transport = make({"kind": "topk", "k": 2}, shards=2)
    transport.down[0] = 3  # down for three attempts, then back
    x = torch.randn(20, 16)
    y = run(router.forward(x.numpy()))
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5
    assert transport.calls[0] == 4


def test_deadline_is_a_typed_error_and_bounded():
    router, _, transport = make({"kind": "topk", "k": 2}, shards=2)
    transport.down = [10**9, 10**9]  # never come back (all tokens may route to one shard)
    with pytest.raises(DeadlineExceededError):
        run(router.forward(np.ones((4, 16), np.float32), timeout_s=0.2))
    assert sum(transport.calls) > 1  # it did retry, within the deadline


def test_full_queue_rejects_instead_of_growing():
    router, _, _ = make({"kind": "topk", "k": 2}, limits={"max_queued_requests": 2}, delay_s=0.05)

    async def main():
        return await asyncio.gather(
            *(router.forward(np.ones((2, 16), np.float32)) for _ in range(12)),
            return_exceptions=True,
        )

    outs = run(main())
    rejected = [o for o in outs if isinstance(o, PoolOverloadedError)]
    assert rejected and len(rejected) < 12
    assert all(isinstance(o, np.ndarray | PoolOverloadedError) for o in outs)


def test_bad_request_fails_alone():
    router, layer, _ = make({"kind": "topk", "k": 2}, delay_s=0.002)
    good = torch.randn(5, 16)

    async def main():
        bad = np.ones((3, 15), np.float32)
        calls = [router.forward(good.numpy()), router.forward(bad), router.forward(good.numpy())]
        return await asyncio.gather(*calls, return_exceptions=True)

    a, bad, b = run(main())
    assert isinstance(bad, ShapeError)
    with torch.no_grad():
        assert np.abs(a - layer(good).numpy()).max() <= 1e-5
        assert np.abs(b - layer(good).numpy()).max() <= 1e-5


def test_client_routes_and_gated_requests_share_a_batch():
    router, layer, _ = make({"kind": "topk", "k": 2}, delay_s=0.002)
    x = torch.randn(6, 16)
    with torch.no_grad():
        want, info = layer(x, return_info=True)
    ids = torch.cat([info.expert_ids, torch.full((6, 1), -1)], 1).numpy()  # 3 slots, one empty
    w = torch.cat([info.weights, torch.zeros(6, 1)], 1).numpy()

    async def main():
        routed = router.forward(x.numpy(), expert_ids=ids, weights=w)
        return await asyncio.gather(router.forward(x.numpy()), routed)

    for y in run(main()):
        assert np.abs(y - want.numpy()).max() <= 1e-5


def test_placement_versions_only_move_forward():
    router, _, _ = make({"kind": "topk", "k": 2}, shards=2)
    router.set_placement(contiguous(8, 2, version=5))
    router.set_placement(contiguous(8, 2, version=3))
    assert router.table.version == 5


def test_metrics_count_what_the_stats_count():
    metrics = RecordingMetrics()
    router, _, transport = make(
        {"kind": "topk", "k": 2}, replicas={e: 2 for e in range(8)}, metrics=metrics
    )
    transport.down[1] = 1  # one retry
    run(router.forward(np.ones((5, 16), np.float32)))
    run(router.forward(np.ones((3, 16), np.float32)))
    with pytest.raises(ShapeError):
        run(router.forward(np.ones((3, 15), np.float32)))
    st = router.stats()
    assert metrics.total("raymoe_requests_total") == st["requests"] == 2
    assert metrics.total("raymoe_tokens_total") == st["tokens"] == 8
    assert metrics.total("raymoe_request_errors_total", error="ShapeError") == 1
    assert metrics.total("raymoe_retries_total") == st["counters"]["retries"] == 1
    pairs = [metrics.total("raymoe_shard_pairs_total", shard=str(n)) for n in range(2)]
    assert pairs == list(st["shard_pairs"]) and sum(pairs) == 8 * 2
    assert len(metrics.observed[("raymoe_request_latency_seconds", ())]) == 2
    assert sorted(metrics.observed[("raymoe_batch_tokens", ())]) == [3, 5]
    stages = {dict(t)["stage"] for n, t in metrics.observed if n == "raymoe_stage_seconds"}
    assert stages == {"route", "dispatch", "combine"}
    assert metrics.values[("raymoe_queue_depth", (("router", "0"),))] == 0
