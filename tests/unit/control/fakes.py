"""A fake cluster for the controller's state machine: actors are plain objects (the real
ExpertShard and Router classes), calls are direct, and an actor can be made to die."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import torch

from raymoe import MoELayer, PoolSpec
from raymoe._private.control import durable
from raymoe._private.control.cluster import ActorUnreachable
from raymoe._private.control.controller import Controller
from raymoe._private.control.goal import Goal
from raymoe._private.data.router import Router
from raymoe._private.data.shard import ExpertShard
from raymoe.store import MemoryStore
from tests.helpers import spec_dict


class Calls:
    """ShardCalls over in-process shards."""

    def __init__(self, shards):
        self.handles = shards

    async def compute(self, n, x, ids, w, digest, keep=None):
        return self.handles[n].compute(x, ids, w, digest, keep)

    async def backward(self, n, x, ids, w, grad_y, digest, keep=None):
        return self.handles[n].backward(x, ids, w, grad_y, digest, keep)

    def retryable(self, error):
        return False

    async def forget(self, n):
        pass


class FakeRouter(Router):
    def configure_pool(self, shards, placement, weights=None, spec=None, routing_version=0):
        self.configure(Calls(list(shards)), placement, weights, spec, routing_version)


class FakeCluster:
    """Actors are plain objects; 'restarting' one replaces it by a fresh, empty instance;
    a handle in ``dead`` answers every call with ActorUnreachable."""

    def __init__(self, spec):
        self.spec = spec
        self.actors: dict[tuple[str, int], object] = {}
        self.killed = []
        self.dead: set[int] = set()  # id() of handles that do not answer
        self.calls: list[tuple[str, str]] = []  # (actor kind, method), in order
        self.node_ids = ["node-a"]
        self.memory = 1 << 34  # what the nodes report (the default memory budget's base)
        self.refuse: set[str] = set()  # nodes where a gateway cannot bind its port
        self.before: dict[str, object] = {}  # method -> coroutine fn awaited before it runs
        self.shard_nodes: dict[int, str] = {}  # the node each shard reports (failure domains)

    def shard(self, i):
        return self.actors.setdefault(("shard", i), ExpertShard(self.spec, i))

    def router(self, i):
        return self.actors.setdefault(("router", i), FakeRouter(self.spec))

    def spare(self, i):
        return self.actors.setdefault(("spare", i), ExpertShard(self.spec, -1 - i))

    def alive(self, handles):
        return [id(h) not in self.dead for h in handles]

    def restart(self, role, i):
        self.actors.pop((role, i))
        return getattr(self, role)(i)

    def put(self, value):
        return value

    async def call(self, handle, method, *args, timeout=None):
        self.calls.append((type(handle).__name__, method))
        if id(handle) in self.dead:
            raise ActorUnreachable(f"{method}(): dead")
        hook = self.before.get(method)
        if hook is not None:
            await hook()
        out = getattr(handle, method)(*args)
        out = await out if inspect.isawaitable(out) else out
        if method == "status" and isinstance(handle, ExpertShard):
            out = {**out, "node": self.shard_nodes.get(handle.shard_id)}
        return out

    def kill(self, handles):
        self.killed += handles

    def nodes(self):
        return list(self.node_ids)

    def memory_bytes(self):
        return self.memory

    def gateway(self, key, node):
        return self.actors.setdefault(("gateway", key), FakeGateway(node, self))


class FakeGateway:
    def __init__(self, node, cluster):
        self.node, self.cluster = node, cluster

    def endpoint(self):
        if self.node in self.cluster.refuse:
            raise RuntimeError(f"Failed to bind to address {self.node}:50051")
        return f"{self.node or 'any'}:50051"


def setup(store=None, E=8, shards=2, routers=2, metrics=None, min_replicas=1, spares=0, **gateway):
    """(controller, cluster, reference layer, its weights): a topk pool whose weights are
    unlike its seeded init."""
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=E),
            "shards": {
                "count": shards,
                "routers": routers,
                "min_replicas": min_replicas,
                "spares": spares,
            },
            "gateway": {"enabled": bool(gateway), **gateway},
        }
    )
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5)  # unlike the seeded init
    weights = {k: v.numpy() for k, v in layer.state_dict().items()}
    cluster = FakeCluster(spec)
    return Controller(spec, cluster, store or MemoryStore(), metrics), cluster, layer, weights


LOOP = asyncio.new_event_loop()  # one loop: the routers' queues and events live on it


def run(coro):
    return LOOP.run_until_complete(coro)


def start(ctl, placement, weights=None) -> None:
    """Start ``ctl``'s pool on ``placement`` with ``weights`` as ``raymoe.serve`` does."""
    goal = Goal.initial(ctl.spec).replace(placement=placement)
    run(ctl.start(durable.served_with(goal, weights)))


def served(ctl, x: torch.Tensor) -> list[np.ndarray]:
    """``x`` through every router of the controller's pool."""

    async def each():
        return await asyncio.gather(*(r.forward(x.numpy()) for r in ctl.routers))

    return run(each())


def close(ctl, ref: MoELayer, x: torch.Tensor, atol=1e-5) -> None:
    with torch.no_grad():
        want = ref(x).numpy()
    ys = served(ctl, x)
    assert all(np.abs(y - want).max() <= atol for y in ys)


def settle(ctl) -> None:
    """Run an update pass and wait for what it started."""

    async def main():
        await ctl.update()
        await asyncio.gather(*ctl._busy.values())

    run(main())
