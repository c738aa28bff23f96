"""A pool's gRPC gateway as a Ray actor: :class:`raymoe._private.data.gateway.Gateway` over
:class:`RayPoolBackend`, the pool's named controller and routers."""

from __future__ import annotations

import asyncio
import itertools
import logging

import ray

from raymoe._private.actors import get_controller, wait_async
from raymoe._private.data.gateway import Gateway, GatewayThread
from raymoe._private.metrics import RayMetrics
from raymoe.config import PoolSpec
from raymoe.errors import PoolUnavailableError
from raymoe.reports import OpReport, PoolDescription, PoolStats


class RayPoolBackend:
    """:class:`raymoe._private.gateway.PoolBackend` over a pool's named actors."""

    def __init__(self, pool: str):
        self.pool = pool
        self._controller = None
        self._routers: list = []
        self._next = itertools.count()

    async def _attach(self):
        if self._controller is None:
            try:
                controller = get_controller(self.pool)
            except ValueError:
                raise PoolUnavailableError(f"no raymoe pool named {self.pool!r} runs") from None
            self._routers = await wait_async(controller.routers.remote())
            self._controller = controller
        return self._controller

    async def _call(self, handle_of, method: str, *args, **kwargs):
        await self._attach()
        try:
            return await wait_async(getattr(handle_of(), method).remote(*args, **kwargs))
        except PoolUnavailableError:
            self._controller = None  # the pool may have been shut down and started again
            raise

    async def forward(self, x, expert_ids, weights, token_ids, timeout_s, layer=0):
        """On the next router; a call whose router dies is resent to the next one at once
        (forward is idempotent), each router tried once."""
        await self._attach()
        routes = {"expert_ids": expert_ids, "weights": weights, "token_ids": token_ids}
        for attempt in range(len(self._routers)):
            router = self._routers[next(self._next) % len(self._routers)]
            ref = router.forward.options(max_task_retries=0).remote(
                x, timeout_s=timeout_s, layer=layer, info=True, **routes
            )
            try:
                y, info = await wait_async(ref)
                return y, info["degraded_tokens"]
            except PoolUnavailableError as e:
                router_died = isinstance(e.__cause__, ray.exceptions.RayActorError)
                if not router_died or attempt == len(self._routers) - 1:
                    self._controller = None  # routers may have been replaced: fetch again
                    raise

    async def stats(self, window_s: float, load_bins: int = 0) -> PoolStats:
        return await self._call(lambda: self._controller, "stats", window_s, load_bins)

    async def describe(self) -> PoolDescription:
        return await self._call(lambda: self._controller, "describe")

    async def op(self, name: str, *args, **kwargs) -> OpReport:
        return await self._call(lambda: self._controller, "op", name, *args, **kwargs)

    async def save_checkpoint(self, path: str) -> dict:
        return await self._call(lambda: self._controller, "save_checkpoint", path)

    async def ready(self) -> bool:
        await self._attach()
        states = await asyncio.gather(
            *(wait_async(r.ready.remote()) for r in self._routers), return_exceptions=True
        )
        ok = any(s is True for s in states)
        if not ok:
            self._controller = None  # routers replaced meanwhile: fetched again next time
        return ok


class GatewayActor:
    """A pool's gRPC gateway, on its own event loop thread inside the actor process (so a
    restarted actor serves again from ``__init__``, with nobody to call a start method)."""

    def __init__(self, spec: PoolSpec):
        logging.basicConfig(level=logging.INFO)
        gateway = Gateway(spec, RayPoolBackend(spec.name), metrics=RayMetrics(spec.name))
        self._thread = GatewayThread(gateway)

    def endpoint(self) -> str:
        return self._thread.endpoint

    def stop(self) -> None:
        self._thread.stop()
