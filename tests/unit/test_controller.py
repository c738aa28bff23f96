"""The controller's state machine with a fake cluster (no Ray), and the metadata stores."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
import torch

from raymoe import MoELayer, PoolSpec
from raymoe._private.controller import Controller, merge_stats
from raymoe._private.placement import Placement, contiguous, replicated
from raymoe._private.router import Router
from raymoe._private.shard import ExpertShard
from raymoe.store import EmbeddedStore, MemoryStore
from tests.helpers import spec_dict


class Calls:
    def __init__(self, shards):
        self.shards = shards

    async def compute(self, n, x, ids, w):
        return self.shards[n].compute(x, ids, w)

    def retryable(self, error):
        return False


class FakeRouter(Router):
    def configure_pool(self, shards, placement, weights=None):
        self.configure(Calls(shards), placement, weights)


class FakeCluster:
    """Actors are plain objects; 'restarting' one replaces it by a fresh, empty instance."""

    def __init__(self, spec):
        self.spec = spec
        self.actors: dict[tuple[str, int], object] = {}
        self.killed = []

    def shard(self, i):
        return self.actors.setdefault(("shard", i), ExpertShard(self.spec, i))

    def router(self, i):
        return self.actors.setdefault(("router", i), FakeRouter(self.spec))

    def restart(self, role, i):
        self.actors.pop((role, i))
        return getattr(self, role)(i)

    def put(self, value):
        return value

    async def call(self, handle, method, *args, timeout=None):
        out = getattr(handle, method)(*args)
        return await out if inspect.isawaitable(out) else out

    def kill(self, handles):
        self.killed += handles


def setup(store=None):
    spec = PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8),
                               "shards": {"count": 2, "routers": 2}})  # fmt: skip
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5)  # unlike the seeded init
    weights = {k: v.numpy() for k, v in layer.state_dict().items()}
    cluster = FakeCluster(spec)
    ctl = Controller(spec, cluster, store or MemoryStore())
    return ctl, cluster, layer, weights


async def served(ctl, x):
    return await ctl.routers[0].forward(x.numpy())


def test_start_configures_everything_and_saves_the_goal_first():
    ctl, _, layer, weights = setup()

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        return await served(ctl, x)

    x = torch.randn(9, 16)
    y = asyncio.run(main())
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5
    g = Controller.load_goal(ctl.store, ctl.spec.name)
    assert g["spec"] == ctl.spec and g["placement"].version == 1 and g["has_rows"]
    assert g["pending"] is None
    assert all(r.ready for r in ctl.routers)


def test_update_reloads_a_restarted_shard_and_router():
    ctl, cluster, layer, weights = setup()
    x = torch.randn(9, 16)

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        ctl.shards[1] = cluster.restart("shard", 1)  # comes back empty
        ctl.routers[1] = cluster.restart("router", 1)
        assert not ctl.shards[1].ready and not ctl.routers[1].ready
        await ctl.update()
        await asyncio.gather(*ctl._busy.values())
        return await asyncio.gather(*(r.forward(x.numpy()) for r in ctl.routers))

    outs = asyncio.run(main())
    with torch.no_grad():
        for y in outs:
            assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_update_publishes_a_newer_placement():
    ctl, _, _, weights = setup()

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        ctl.placement = replicated(ctl.placement, {}, version=2)
        await ctl.update()
        await asyncio.gather(*ctl._busy.values())

    asyncio.run(main())
    assert [r.placement.version for r in ctl.routers] == [2, 2]


def test_update_survives_a_failing_cluster(caplog):
    ctl, _, _, weights = setup()

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        ctl.placement = None  # break the goal: update must log and return, not raise
        await ctl.update()

    asyncio.run(main())
    assert "controller update failed" in caplog.text


def test_recover_resumes_from_the_store(tmp_path):
    store = EmbeddedStore(tmp_path)
    ctl, cluster, layer, weights = setup(store)
    x = torch.randn(9, 16)

    async def main():
        await ctl.start(replicated(contiguous(8, 2), {3: 2}, version=4), weights)
        again = Controller(ctl.spec, cluster, EmbeddedStore(tmp_path))  # the restarted one
        await again.recover()
        return again, await again.routers[1].forward(x.numpy())

    again, y = asyncio.run(main())
    assert again.placement.version == 4 and again.describe()["replicas"] == 9
    assert again._rows.keys() == {0, 1}  # weights taken back from the live shards
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_shutdown_kills_actors_and_forgets_state():
    ctl, cluster, _, weights = setup()
    asyncio.run(ctl.start(contiguous(8, 2), weights))
    asyncio.run(ctl.shutdown())
    assert len(cluster.killed) == 4 and ctl.store.keys() == []
    with pytest.raises(LookupError):
        Controller.load_goal(ctl.store, ctl.spec.name)


def test_merge_stats():
    r = {"requests": [(10.0, 4, 0.002), (11.0, 4, 0.004)], "batch_tokens": [8],
         "counters": {"batches": 1}, "shard_load": np.array([6, 2]),
         "expert_load": np.ones(8, np.int64)}  # fmt: skip
    st = merge_stats([r, r], 2, 8, window_s=60)
    assert st["requests"] == 4 and st["counters"] == {"batches": 2}
    assert st["pairs_per_shard"] == [12, 4] and st["imbalance"] == 1.5
    assert st["tokens_per_s"] == 16.0 and st["latency_ms"]["p50"] == pytest.approx(3.0)


@pytest.mark.parametrize("make", [MemoryStore, EmbeddedStore], ids=["memory", "embedded"])
def test_store_roundtrip(make, tmp_path):
    store = make(tmp_path) if make is EmbeddedStore else make()
    assert store.get("p/a") is None
    store.put("p/a", b"1")
    store.put("p/b/c", b"2")
    store.put("q", b"3")
    assert store.get("p/a") == b"1" and store.keys("p/") == ["p/a", "p/b/c"]
    store.delete("p/a")
    store.delete("p/a")  # idempotent
    assert store.keys("p/") == ["p/b/c"]


def test_placement_bytes_roundtrip():
    p = replicated(contiguous(10, 3), {1: 3}, version=7)
    q = Placement.from_bytes(p.to_bytes())
    assert q.version == 7 and q.num_shards == 3
    assert all(torch.equal(getattr(p, k), getattr(q, k)) for k in ("ptr", "shard", "local"))
