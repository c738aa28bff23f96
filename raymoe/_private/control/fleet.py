"""The pool's gRPC gateways, kept by the controller (its Ray calls go through the cluster it
is given).

With ``gateway.enabled`` the pool has one gateway; with ``gateway.per_node`` too, one on
every alive node, nodes that join later included (a KubeRay worker group scaling up gets
its gateways within ``timeouts.FLEET_CHECK_S``). The gateway of a node that left is stopped.
Gateways are detached, restartable actors with names of their own, so a restarted
controller finds them again instead of starting new ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from raymoe._private import timeouts
from raymoe._private.control.cluster import Cluster
from raymoe.config import GatewaySpec
from raymoe.errors import PoolError

log = logging.getLogger(__name__)

SINGLE = "0"  # key of the one gateway of a pool that is not per_node


class GatewayFleet:
    """The gateways of pool ``pool`` as its ``gateway`` section asks for them."""

    def __init__(self, cluster: Cluster, pool: str, gateway: GatewaySpec):
        self.cluster, self.pool, self.config = cluster, pool, gateway
        self.gateways: dict[str, tuple[Any, str]] = {}  # node id (or SINGLE) -> handle, endpoint
        self._checked = -float("inf")

    def endpoints(self) -> list[str]:
        """The "host:port" of each running gateway."""
        return sorted(endpoint for _, endpoint in self.gateways.values())

    def due(self) -> bool:
        """Whether it is time to look for nodes that joined or left (and note that it is)."""
        if not self.config.enabled or time.monotonic() - self._checked < timeouts.FLEET_CHECK_S:
            return False
        self._checked = time.monotonic()
        return True

    async def ensure(self, strict: bool = False) -> None:
        """Start the gateways that should run and do not; stop those of nodes that left.

        With ``strict`` (deploying), one that cannot start raises :class:`PoolError`;
        otherwise it is logged and tried again on the next check."""
        g = self.config
        wanted = (self.cluster.nodes() if g.per_node else [SINGLE]) if g.enabled else []
        for key in [k for k in self.gateways if k not in wanted]:
            handle, endpoint = self.gateways.pop(key)
            self.cluster.kill([handle])
            log.info("gateway on %s stopped: its node left the cluster", endpoint)
        new = [k for k in wanted if k not in self.gateways]
        started = await asyncio.gather(*(self._start(k) for k in new), return_exceptions=True)
        errors = []
        for key, got in zip(new, started, strict=True):
            if isinstance(got, BaseException):
                errors.append(f"{'node ' + key if key != SINGLE else 'gateway'}: {_reason(got)}")
            else:
                self.gateways[key] = got
                log.info("gateway serving on %s", got[1])
        if errors and strict:
            raise PoolError(
                f"the gateway of pool {self.pool!r} could not start: " + "; ".join(errors)
            )
        for e in errors:
            log.warning("%s (tried again in %.0f s)", e, timeouts.FLEET_CHECK_S)

    async def _start(self, key: str) -> tuple[Any, str]:
        handle = self.cluster.gateway(key, None if key == SINGLE else key)
        try:
            endpoint = await self.cluster.call(handle, "endpoint", timeout=timeouts.GATEWAY_START_S)
        except BaseException:
            self.cluster.kill([handle])  # e.g. its port is taken: free the name for a retry
            raise
        return handle, endpoint

    def stop(self) -> None:
        self.cluster.kill([h for h, _ in self.gateways.values()])
        self.gateways.clear()


def _reason(e: BaseException) -> str:
    """The last line of an error (Ray's carry the whole remote traceback before it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]
