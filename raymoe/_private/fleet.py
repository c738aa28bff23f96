"""The pool's gRPC gateways, kept by the controller (a mixin of
:class:`raymoe._private.controller.Controller`; its Ray calls go through ``cluster``).

With ``gateway.enabled`` the pool has one gateway; with ``gateway.per_node`` too, one on
every alive node, nodes that join later included (a KubeRay worker group scaling up gets
its gateways within :data:`CHECK_S`). The gateway of a node that left is stopped. Gateways
are detached, restartable actors with names of their own, so a restarted controller finds
them again instead of starting new ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from raymoe.errors import PoolError

log = logging.getLogger(__name__)

CHECK_S = 5.0  # how often the controller looks for nodes that joined or left
START_TIMEOUT_S = 60.0  # for a gateway to come up and report its endpoint
SINGLE = "0"  # key of the one gateway of a pool that is not per_node


class GatewayFleet:
    """Needs the controller's ``spec`` and ``cluster``."""

    def _init_fleet(self) -> None:
        self.gateways: dict[str, tuple[Any, str]] = {}  # node id (or SINGLE) -> handle, endpoint
        self._fleet_checked = -float("inf")

    def gateway_endpoints(self) -> list[str]:
        """The "host:port" of each running gateway."""
        return sorted(endpoint for _, endpoint in self.gateways.values())

    def _fleet_due(self) -> bool:
        if not self.spec.gateway.enabled or time.monotonic() - self._fleet_checked < CHECK_S:
            return False
        self._fleet_checked = time.monotonic()
        return True

    async def ensure_gateways(self, strict: bool = False) -> None:
        """Start the gateways that should run and do not; stop those of nodes that left.

        With ``strict`` (deploying), one that cannot start raises :class:`PoolError`;
        otherwise it is logged and tried again on the next check."""
        g = self.spec.gateway
        wanted = (self.cluster.nodes() if g.per_node else [SINGLE]) if g.enabled else []
        for key in [k for k in self.gateways if k not in wanted]:
            handle, endpoint = self.gateways.pop(key)
            self.cluster.kill([handle])
            log.info("gateway on %s stopped: its node left the cluster", endpoint)
        new = [k for k in wanted if k not in self.gateways]
        started = await asyncio.gather(*(self._start_gateway(k) for k in new),
                                       return_exceptions=True)  # fmt: skip
        errors = []
        for key, got in zip(new, started, strict=True):
            if isinstance(got, BaseException):
                errors.append(f"{'node ' + key if key != SINGLE else 'gateway'}: {_reason(got)}")
            else:
                self.gateways[key] = got
                log.info("gateway serving on %s", got[1])
        if errors and strict:
            raise PoolError(f"the gateway of pool {self.spec.name!r} could not start: "
                            + "; ".join(errors))  # fmt: skip
        for e in errors:
            log.warning("%s (tried again in %.0f s)", e, CHECK_S)

    async def _start_gateway(self, key: str) -> tuple[Any, str]:
        handle = self.cluster.gateway(key, None if key == SINGLE else key)
        try:
            endpoint = await self.cluster.call(handle, "endpoint", timeout=START_TIMEOUT_S)
        except BaseException:
            self.cluster.kill([handle])  # e.g. its port is taken: free the name for a retry
            raise
        return handle, endpoint

    def stop_gateways(self) -> None:
        self.cluster.kill([h for h, _ in self.gateways.values()])
        self.gateways.clear()


def _reason(e: BaseException) -> str:
    """The last line of an error (Ray's carry the whole remote traceback before it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]
