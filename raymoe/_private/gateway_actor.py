"""A pool's gRPC gateway as a Ray actor: :class:`raymoe._private.data.gateway.Gateway` over
:class:`RayPoolBackend`, the pool's named controller and routers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import numpy as np
import ray

from raymoe._private import timeouts
from raymoe._private.actors import get_controller, wait_async
from raymoe._private.data.attempts import Picker
from raymoe._private.data.gateway import Gateway, GatewayThread
from raymoe._private.direct import DirectView
from raymoe._private.metrics import RayMetrics
from raymoe.config import PoolSpec
from raymoe.errors import PoolUnavailableError
from raymoe.reports import OpReport, PoolDescription, PoolStats


class RayPoolBackend:
    """:class:`raymoe._private.gateway.PoolBackend` over a pool's named actors. Small
    requests go straight to the shards (:mod:`raymoe._private.direct`, one at a time, on a
    worker thread), as from a ``PoolHandle``."""

    def __init__(self, pool: str):
        self.pool = pool
        self._controller = None
        self._routers: list = []
        self._picker = Picker()  # which router next; silent ones are hedged
        self._view = DirectView(self._publication)
        self._asked = itertools.count()  # which router the view asks next

    async def _attach(self):
        if self._controller is None:
            try:
                controller = get_controller(self.pool)
            except ValueError:
                raise PoolUnavailableError(f"no raymoe pool named {self.pool!r} runs") from None
            self._routers = await wait_async(controller.routers.remote())
            self._picker = Picker()
            self._controller = controller
        return self._controller

    async def _call(self, handle_of, method: str, *args, **kwargs):
        await self._attach()
        try:
            return await wait_async(getattr(handle_of(), method).remote(*args, **kwargs))
        except PoolUnavailableError:
            self._controller = None  # the pool may have been shut down and started again
            raise

    async def _publication(self, gates_of: int | None, traffic: dict | None) -> dict | None:
        """One router's publication, for the view (on the view's own event loop)."""
        routers = self._routers
        if not routers:
            return None  # not attached yet: the first forward attaches
        router = routers[next(self._asked) % len(routers)]
        return await router.published.remote(gates_of, traffic)

    async def forward(self, x, expert_ids, weights, token_ids, timeout_s, layer=0):
        """Straight to the shards if small (and no other such request runs), else on the
        next router; a call whose router dies is resent to the next one at once, one whose
        router stays silent (its node died) is hedged to another (forward is idempotent)."""
        await self._attach()
        tokens = int(np.prod(np.shape(x)[:-1]))
        if self._view.may_serve(tokens):
            args = (x, expert_ids, weights, token_ids, layer, timeout_s)
            y = await asyncio.to_thread(self._view.serve, *args)
            if y is not None:
                return y, 0
        routes = {"expert_ids": expert_ids, "weights": weights, "token_ids": token_ids}
        n = len(self._routers)

        def send(i: int) -> asyncio.Future:
            ref = (
                self._routers[i]
                .forward.options(max_task_retries=0)
                .remote(x, timeout_s=timeout_s, layer=layer, info=True, **routes)
            )
            return asyncio.ensure_future(wait_async(ref))

        calls = {}  # future -> (router index, sent at)
        tried, hedged = 0, False
        try:
            while True:
                if not calls:
                    i = self._picker.pick(n)
                    calls[send(i)] = (i, time.monotonic())
                    tried += 1
                wait_s = None
                if not hedged and n > 1:
                    sent = min(t for _, t in calls.values())
                    wait_s = max(sent + self._picker.budget(tokens) - time.monotonic(), 0.0)
                done, _ = await asyncio.wait(calls, timeout=wait_s, return_when="FIRST_COMPLETED")
                if not done:  # silent: hedged once, to another router
                    (i, _), hedged = next(iter(calls.values())), True
                    self._picker.suspect(i)
                    j = self._picker.pick(n, avoid=i)
                    calls[send(j)] = (j, time.monotonic())
                    continue
                fut = done.pop()
                i, sent = calls.pop(fut)
                try:
                    y, info = fut.result()
                except PoolUnavailableError as e:
                    if not isinstance(e.__cause__, ray.exceptions.RayActorError):
                        raise
                    self._picker.suspect(i)
                    if calls or tried < n:
                        continue  # the hedge may still answer; else the next router
                    self._controller = None  # routers may have been replaced: fetch again
                    raise
                self._picker.answered(i, time.monotonic() - sent, tokens)
                return y, info["degraded_tokens"]
        finally:
            for fut in calls:
                fut.cancel()

    async def stats(self, window_s: float, load_bins: int = 0) -> PoolStats:
        await asyncio.to_thread(self._view.flush)  # its direct requests count
        return await self._call(lambda: self._controller, "stats", window_s, load_bins)

    async def describe(self) -> PoolDescription:
        return await self._call(lambda: self._controller, "describe")

    async def op(self, name: str, *args, **kwargs) -> OpReport:
        if name == "rebalance":  # its direct requests count in the load
            await asyncio.to_thread(self._view.flush)
        return await self._call(lambda: self._controller, "op", name, *args, **kwargs)

    async def save_checkpoint(self, path: str) -> dict:
        return await self._call(lambda: self._controller, "save_checkpoint", path)

    async def ready(self) -> bool:
        await self._attach()
        states = await asyncio.gather(  # NOTE: a router on a dead node answers nothing
            *(
                asyncio.wait_for(wait_async(r.ready.remote()), timeouts.STATUS_S)
                for r in self._routers
            ),
            return_exceptions=True,
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
