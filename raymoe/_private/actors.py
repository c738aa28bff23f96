"""The one place where raymoe's plain classes become Ray actors and where Ray is called.

Actor options (name, namespace, resources, lifetime) are applied here; state machines and the
data path never call ``ray.get`` or ``ray.remote`` themselves.
"""

from __future__ import annotations

import numpy as np
import ray

from raymoe._private.placement import Placement
from raymoe._private.router import Router
from raymoe._private.shard import ExpertShard
from raymoe.config import PoolSpec

NAMESPACE = "raymoe"


def actor_name(pool: str, role: str, index: int) -> str:
    return f"{pool}:{role}:{index}"


class RayShardCalls:
    """:class:`raymoe._private.router.ShardCalls` over the Ray object store."""

    def __init__(self, handles: list):
        self.handles = handles

    def compute_many(self, calls):
        refs = [self.handles[n].compute.remote(x, ids, w) for n, x, ids, w in calls]
        return ray.get(refs)


class RouterActor(Router):
    """Router that builds its shard transport from actor handles inside the actor."""

    def __init__(self, spec: PoolSpec, shard_handles: list, placement: Placement, weights=None):
        super().__init__(spec, RayShardCalls(shard_handles), placement, weights)


def _resources(spec: PoolSpec) -> dict:
    gpu = spec.shards.num_gpus if spec.shards.device != "cpu" else 0.0
    return {"num_cpus": spec.shards.num_cpus, "num_gpus": gpu}


def start_shards(spec: PoolSpec, placement: Placement, weights: dict | None) -> tuple[list, list]:
    """One ExpertShard actor per shard, loaded with ``weights`` (neutral names) if given.

    Returns (shard handles, object refs of their rows). NOTE: Ray does not keep constructor
    arguments alive for restarts; whoever owns the pool must hold the refs.

    Shards restart when they die and their in-flight calls are retried (Ray's
    ``max_restarts`` / ``max_task_retries``); the rows travel as an object-store argument of
    the constructor, so a restarted shard comes back with the same weights.
    """
    device = "cuda" if spec.shards.device == "cuda" or spec.shards.num_gpus > 0 else "cpu"
    cls = ray.remote(ExpertShard)
    handles, pinned = [], []
    for n in range(placement.num_shards):
        experts = placement.shard_experts(n).numpy()
        rows = None
        if weights:
            rows = ray.put({k.removeprefix("experts."): np.asarray(v)[experts]
                            for k, v in weights.items() if k.startswith("experts.")})  # fmt: skip
            pinned.append(rows)
        opts = {"name": actor_name(spec.name, "shard", n), "namespace": NAMESPACE,
                "max_restarts": -1, "max_task_retries": -1}  # fmt: skip
        handles.append(
            cls.options(**opts, **_resources(spec)).remote(spec, n, experts, device, rows)
        )
    ray.get([h.take_load.remote() for h in handles])  # every shard built and loaded
    return handles, pinned


def start_routers(spec: PoolSpec, shards: list, placement: Placement, weights) -> list:
    cls = ray.remote(RouterActor)
    routers = []
    for i in range(spec.shards.routers):
        opts = {"name": actor_name(spec.name, "router", i), "namespace": NAMESPACE}
        routers.append(cls.options(**opts, num_cpus=0).remote(spec, shards, placement, weights))
    return routers


def get_router(pool: str, index: int):
    return ray.get_actor(actor_name(pool, "router", index), namespace=NAMESPACE)


def wait(refs):
    return ray.get(refs)


def kill(handles: list) -> None:
    for h in handles:
        ray.kill(h, no_restart=True)
