"""Run as a subprocess by test_gateway.py: a two-node Ray cluster of its own (the session's
cluster has one node), where a node joins and leaves a pool with per-node gateways."""

from __future__ import annotations

import time

import ray
import torch
from ray.cluster_utils import Cluster

import raymoe
from raymoe import MoELayer, PoolSpec
from tests.helpers import spec_dict


def wait_for(pool, count: int, timeout_s: float = 60.0) -> list[str]:
    end = time.monotonic() + timeout_s
    while len(got := pool.gateways()) != count:
        assert time.monotonic() < end, f"gateways {got}, expected {count}"
        time.sleep(0.5)
    return got


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, namespace="raymoe", log_to_driver=False)
    s = spec_dict({"kind": "topk", "k": 2}, E=8, d=16)
    gateway = {"enabled": True, "per_node": True, "host": "127.0.0.1", "port": 0}
    s.update(name="nodes", shards={"count": 2}, gateway=gateway)
    spec = PoolSpec.from_dict(s)
    pool = raymoe.serve(spec)
    try:
        (first,) = wait_for(pool, 1)
        node = cluster.add_node(num_cpus=1)
        (joined,) = set(wait_for(pool, 2)) - {first}
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = MoELayer(spec)(x)
        with raymoe.Client(joined) as c:  # the new node's gateway serves the pool
            assert (c.forward(x) - want).abs().max() <= 1e-5
        cluster.remove_node(node)
        assert wait_for(pool, 1) == [first]
    finally:
        pool.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print("ok")


if __name__ == "__main__":
    main()
