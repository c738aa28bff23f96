"""Runtime operations on a live pool under concurrent traffic: no request fails, every answer
equals MoELayer, and the pool's layout changes as asked (checked through describe)."""

from __future__ import annotations

import threading

import pytest
import torch

import raymoe
from raymoe import ConfigError, ExpertIdError, MoELayer, PoolSpec
from tests.helpers import spec_dict

pytestmark = pytest.mark.integration


class Traffic:
    """``clients`` threads sending requests until stopped; records errors and failures."""

    def __init__(self, pool, layer, clients=6):
        self.pool, self.layer = pool, layer
        self.xs = [torch.randn(8 + 4 * i, 16, generator=torch.Generator().manual_seed(i))
                   for i in range(clients)]  # fmt: skip
        with torch.no_grad():
            self.wants = [layer(x) for x in self.xs]
        self.errors: list[float] = []
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i):
        while not self.stop.is_set():
            try:
                y = self.pool.forward(self.xs[i])
                self.errors.append((y - self.wants[i]).abs().max().item())
            except BaseException as e:  # the test asserts there are none
                self.failures.append(e)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
def test_operations_under_traffic_fail_nothing(ray_cluster, transport):
    spec = PoolSpec.from_dict({
        **spec_dict({"kind": "topk", "k": 2, "renormalize": True}, E=16),
        "name": f"t-elastic-{transport}",
        "shards": {"count": 3, "routers": 2, "transport": transport},
    })  # fmt: skip
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.mul_(1.5)  # weights unlike the seeded init: copies must carry these
    pool = raymoe.serve(spec, weights=layer.state_dict())
    try:
        with Traffic(pool, layer) as traffic:
            v0 = pool.describe()["placement_version"]
            r = pool.replicate(3, 3)
            assert r["replicas_added"] == 2 and r["version"] > v0
            assert pool.replicate(3, 3)["replicas_added"] == 0  # idempotent
            assert pool.pin(5, 2)["pinned"] == {5: 2}
            plan = pool.rebalance(dry_run=True)
            assert plan["dry_run"] and plan["version"] == pool.describe()["placement_version"]
            pool.rebalance()
            d = pool.drain_shard(0)
            assert pool.describe()["experts_per_shard"][0] == 0, d
            pool.scale_shards(5)
            d = pool.describe()
            assert d["shards"] == 5 and min(d["experts_per_shard"]) > 0, d  # drain ended
            pool.scale_shards(2)
            d = pool.describe()
            assert d["shards"] == 2 and sum(d["experts_per_shard"]) >= 16
            pool.replicate(3, 1)
            pool.unpin(5)
        assert not traffic.failures, traffic.failures[:1]
        assert len(traffic.errors) > 20 and max(traffic.errors) <= 1e-5
        x = torch.randn(40, 16)
        with torch.no_grad():
            assert (pool.forward(x) - layer(x)).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()


def test_bad_admin_input_is_refused_and_changes_nothing(ray_cluster):
    spec = PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8), "name": "t-admin",
                               "shards": {"count": 2}})  # fmt: skip
    pool = raymoe.serve(spec)
    try:
        before = pool.describe()
        with pytest.raises(ExpertIdError):
            pool.replicate(8, 2)
        with pytest.raises(ExpertIdError):
            pool.pin(-1, 2)
        with pytest.raises(ConfigError, match="replicas"):
            pool.replicate(0, 0)
        with pytest.raises(ConfigError, match="replicas"):
            pool.replicate(0, 3)  # more than the shards
        with pytest.raises(ConfigError, match="shards"):
            pool.scale_shards(0)
        with pytest.raises(ConfigError, match="shards"):
            pool.scale_shards(9)  # more shards than experts
        with pytest.raises(ConfigError, match="shard"):
            pool.drain_shard(5)
        pool.drain_shard(1)
        with pytest.raises(ConfigError, match="last"):
            pool.drain_shard(0)
        with pytest.raises(ConfigError, match="policy"):
            pool.rebalance(policy="nope")
        after = pool.describe()
        assert after["shards"] == before["shards"]
        x = torch.randn(8, 16)
        assert (pool.forward(x) - MoELayer(spec)(x)).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()
