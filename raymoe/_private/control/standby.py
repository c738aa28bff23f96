"""Warm spares (``shards.spares``): shard processes with torch loaded and no experts, one of
which stands in for a shard whose process died until Ray has restarted it.

A restart is a new worker process importing torch and raymoe: ~2 s of CPU on an idle
machine, 4-7 s on a busy one. A spare loads the dead shard's rows (from the goal's weight
files, as the restarted shard will) in a fraction of that, and the routers send it the
shard's sub-batches. With replicas that closes the window in which a second death leaves an
expert with no live replica; without them it shortens the outage itself.

The loop here runs on its own, not in the controller's update pass: that pass waits on the
status of a restarting shard (up to ``timeouts.STATUS_S``), and a death must not wait for it.
Deaths are seen in the GCS's actor table (``Cluster.alive``), at once.

NOTE: safe by construction, not by timing. A spare serves the layout it loaded; a sub-batch
under a newer placement that moved places on that shard is refused by the places digest
(:class:`~raymoe.errors.PlacementMismatchError`) and retried elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from raymoe._private import timeouts
from raymoe._private.control.cluster import ActorUnreachable

log = logging.getLogger(__name__)


class Standby:
    def __init__(self, controller):
        self.controller = controller
        self.spares: list = []
        self.standing: dict[int, int] = {}  # shard -> the spare standing in for it
        self.loaded: dict[int, int] = {}  # spare -> placement version of what it loaded

    @property
    def cluster(self):
        return self.controller.cluster

    def attach(self, count: int) -> None:
        """Get (or create) the named spares; none stands in for anything yet (a restarted
        controller tells the routers so on its first update pass)."""
        self.spares = [self.cluster.spare(j) for j in range(count)]
        self.standing, self.loaded = {}, {}

    def mapping(self) -> dict:
        """What the routers get: {shard: (spare, handle)}."""
        return {n: (j, self.spares[j]) for n, j in self.standing.items()}

    async def run(self) -> None:
        while self.spares:
            try:
                await self.step()
            except Exception:
                log.exception("standby step failed; retrying")
            await asyncio.sleep(timeouts.STANDBY_INTERVAL_S)

    async def step(self) -> None:
        """Stand down the spares of shards that serve again, stand free spares in for
        shards that are down, and tell the routers when either changed."""
        shards = list(self.controller.shards)
        if not self.spares:
            return
        up = await self.controller.alive(shards + self.spares)
        shard_up, spare_up = up[: len(shards)], up[len(shards) :]
        before = dict(self.standing)
        for n, j in list(self.standing.items()):
            if n >= len(shards) or not spare_up[j] or (shard_up[n] and await self._ready(n)):
                del self.standing[n]
        busy = set(self.standing.values())
        free = [j for j, ok in enumerate(spare_up) if ok and j not in busy]
        down = [n for n, ok in enumerate(shard_up) if not ok and n not in self.standing]
        pairs = list(zip(down, free, strict=False))
        version = self.controller.placement.version
        stale = [(n, j) for n, j in self.standing.items() if self.loaded.get(j) != version]
        done = await asyncio.gather(*(self._load(n, j) for n, j in pairs + stale))
        for (n, j), ok in zip(pairs + stale, done, strict=True):
            if ok:
                self.standing[n] = j
                if (n, j) in pairs:
                    log.warning("shard %d is down: spare %d stands in for it", n, j)
                    self.controller.metrics.inc("raymoe_recoveries_total", role="spare")
            else:
                self.standing.pop(n, None)
        if self.standing != before:
            await asyncio.gather(*(self.publish(i) for i in range(len(self.controller.routers))))

    async def publish(self, i: int) -> None:
        """Router ``i`` gets the stand-ins (one that misses them is sent them again by the
        controller's update pass, which compares)."""
        router = self.controller.routers[i]
        with contextlib.suppress(ActorUnreachable):
            await self.cluster.call(
                router, "set_stand_ins", self.mapping(), timeout=timeouts.STATUS_S
            )

    async def _ready(self, n: int) -> bool:
        try:
            st = await self.cluster.call(
                self.controller.shards[n], "status", timeout=timeouts.STANDBY_INTERVAL_S * 10
            )
        except ActorUnreachable:
            return False
        return bool(st["ready"]) and not st.get("loading")

    async def _load(self, n: int, j: int) -> bool:
        """Spare ``j`` loads shard ``n``'s layout and rows as the goal has them now."""
        version = self.controller.placement.version
        try:
            await self.controller.roster.configure_shard(n, self.controller.goal, self.spares[j])
        except Exception as e:  # it stays free; the shard's own restart goes on regardless
            log.warning("spare %d could not load shard %d: %s", j, n, e)
            return False
        self.loaded[j] = version
        return True
