"""The roster: a pool's shard and router actors, and how each one is brought to the goal
(a shard loaded with its layout and its rows from the goal's weight files; a router
configured with the shards, the placement and the routing state, or sent a newer
placement)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from raymoe._private import timeouts
from raymoe._private.control.cluster import ActorUnreachable, Cluster
from raymoe._private.control.goal import Goal
from raymoe.errors import PoolUnavailableError

log = logging.getLogger(__name__)


class Roster:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.shards: list = []
        self.routers: list = []

    def attach(self, goal: Goal) -> None:
        """Get (or create) the named actors ``goal`` needs."""
        self.shards = [self.cluster.shard(n) for n in range(goal.placement.num_shards)]
        self.routers = [self.cluster.router(i) for i in range(goal.spec.shards.routers)]

    async def configure_shard(self, n: int, goal: Goal, into=None) -> None:
        """(Re)load shard ``n`` (or a spare standing in for it, ``into``): the layout of the
        goal's placement merged with the one being applied (a restart mid-change keeps
        both), its rows read from the goal's weight files (the seeded init for experts in
        none). A file that is missing or broken leaves the shard not ready: it never serves
        seeded weights in place of lost ones."""
        args = (layout_of(goal, n), None, True, goal.spec, list(goal.sources))  # one call
        actor = self.shards[n] if into is None else into
        if fence_of(goal):  # before it loads: it never serves older gates meanwhile
            await self.cluster.call(actor, "fence", fence_of(goal), timeout=timeouts.CONFIGURE_S)
        await self.cluster.call(actor, "configure", *args, timeout=timeouts.CONFIGURE_S)

    async def fence_all(self, goal: Goal) -> None:
        """Every shard refuses sub-batches gated under routing versions older than the
        goal's (:meth:`~raymoe._private.data.shard.ExpertShard.fence`); one that does not
        answer is restarting, and is fenced before it loads (:meth:`configure_shard`)."""

        async def one(n: int, h) -> None:
            try:
                await self.cluster.call(h, "fence", fence_of(goal), timeout=timeouts.STATUS_S)
            except ActorUnreachable:
                log.warning("shard %d missed fence %d", n, goal.routing_version)

        await asyncio.gather(*(one(n, h) for n, h in enumerate(self.shards)))

    def revive(self, role: str, i: int) -> bool:
        """Actor ``i`` of ``role`` ("shard" or "router") did not answer: if it was gone for
        good (killed, or its node died), start a new one under its name; it starts empty
        (a shard) or unconfigured (a router). -> whether it is a new one."""
        actors = self.shards if role == "shard" else self.routers
        h = getattr(self.cluster, role)(i)  # NOTE: get-or-create: the same while it restarts
        if h == actors[i]:
            return False
        log.warning("%s %d was gone for good: started a new one", role, i)
        actors[i] = h
        return True

    async def configure_router(self, i: int, goal: Goal, gate) -> None:
        args = (self.shards, goal.placement, gate, goal.spec, goal.routing_version)
        await self.cluster.call(
            self.routers[i], "configure_pool", *args, timeout=timeouts.CONFIGURE_S
        )

    async def publish(self, i: int, goal: Goal, gate=None, routing: bool = False) -> None:
        """Send router ``i`` the goal's placement (and with ``routing``, the spec and gate
        weights that change with it)."""
        p = goal.placement
        args = (p, goal.spec, gate, goal.routing_version) if routing else (p,)
        await self.cluster.call(
            self.routers[i], "set_placement", *args, timeout=timeouts.CONFIGURE_S
        )

    async def publish_all(self, goal: Goal, gate, routing: bool) -> None:
        """Every router gets the goal's placement; one that misses it is retried by the
        controller's update loop."""

        async def one(i: int) -> None:
            try:
                await self.publish(i, goal, gate, routing)
            except ActorUnreachable:
                log.warning(
                    "router %d missed placement %d; the update loop retries",
                    i,
                    goal.placement.version,
                )

        await asyncio.gather(*(one(i) for i in range(len(self.routers))))

    async def gate_weights(self) -> dict[str, np.ndarray]:
        """The gate weights in service, from the first configured router that answers (the
        pool may run the seeded ones: the controller does not keep them)."""
        for h in self.routers:
            try:
                gate = await self.cluster.call(h, "gate_weights", timeout=timeouts.GATE_READ_S)
            except ActorUnreachable:
                continue
            if gate is not None:  # None: restarted and not configured yet
                return gate
        raise PoolUnavailableError("no configured router answered; cannot read the gate weights")

    async def resize(self, count: int) -> list:
        """``count`` shards: new ones start empty; -> the handles of those removed."""
        N = len(self.shards)
        new = [self.cluster.shard(n) for n in range(N, count)]
        await asyncio.gather(
            *(
                self.cluster.call(
                    h, "configure", np.zeros(0, np.int64), timeout=timeouts.CONFIGURE_S
                )
                for h in new
            )
        )
        gone = self.shards[count:]
        self.shards = self.shards[:count] + new
        return gone


def fence_of(goal: Goal) -> int:
    """The oldest routing version a shard may serve a caller's own gating under: the
    goal's, or the one a change in flight brings (the gates change with it)."""
    if goal.pending is not None and goal.pending_spec is not None:
        return goal.pending.version
    return goal.routing_version


def layout_of(goal: Goal, n: int) -> np.ndarray:
    """[P] the expert at each place of shard ``n`` (-1 free) under the goal's placement and,
    where it leaves a place free, the placement being applied."""
    p, pending = goal.placement, goal.pending
    layout = p.shard_layout(n) if n < p.num_shards else np.zeros(0, np.int64)
    if pending is not None and n < pending.num_shards:
        new = pending.shard_layout(n)
        if len(new) > len(layout):
            layout = np.concatenate([layout, np.full(len(new) - len(layout), -1)])
        free = layout[: len(new)] < 0
        layout[: len(new)][free] = new[free]
    return layout
