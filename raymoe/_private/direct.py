"""A trainer's own view of a pool's shards: its training calls go from its process straight
to the shards (:mod:`raymoe._private.data.training`), not through a router, so that each
tensor crosses one process boundary instead of two.

A router publishes the spec, the dispatch table of the placement version it serves and the
shard actors (:meth:`~raymoe._private.data.router.Router.published`); the view holds them,
and takes them again from a router when a shard refuses a call (the placement moved on),
when a call names experts or layers it does not know yet (added since), and when they are
older than ``REFRESH_S`` (replicas added, shards scaled). Its calls run on one event loop
thread per process, shared by every view (the gRPC transport's channels live there).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import ray

from raymoe._private import timeouts
from raymoe._private.pool_actors import shard_calls
from raymoe.errors import ExpertIdError, LayerIndexError, PoolUnavailableError

REFRESH_S = 1.0  # the most a view serves from a publication before taking a new one

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop thread for training calls (a daemon, made on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True, name="raymoe-train").start()
        return _loop


class DirectView:
    """:class:`~raymoe._private.data.training.ShardView` of a pool, from its routers'
    publications. ``fetch()`` -> an ObjectRef of one router's :meth:`published`."""

    def __init__(self, fetch: Callable[[], ray.ObjectRef]):
        self._fetch = fetch
        self.spec = self.table = self.shards = None
        self._taken = -float("inf")  # when the view was last taken

    def run(self, fn, *args, timeout_s: float | None = None):
        """``fn(view, *args, timeout_s)`` (a coroutine function of :mod:`.training`) on the
        event loop thread, the view fresh; -> its result. ``timeout_s`` at most the spec's
        ``limits.request_timeout_s``."""
        done = asyncio.run_coroutine_threadsafe(self._run(fn, args, timeout_s), _event_loop())
        return done.result()

    async def _run(self, fn, args, timeout_s):
        if time.monotonic() - self._taken > REFRESH_S:
            await self._take()
        limit = self.spec.limits.request_timeout_s
        timeout = min(timeout_s or limit, limit)
        try:
            return await fn(self, *args, timeout)
        except (ExpertIdError, LayerIndexError):
            if not await self._take():  # nothing new to know: the call is wrong
                raise
            return await fn(self, *args, timeout)  # experts or layers added since

    async def newer(self, version: int, deadline: float):
        """A table of a placement version above ``version``, taken from a router as soon as
        one publishes it; :class:`PoolUnavailableError` past ``deadline``."""
        while True:
            await self._take()
            if self.table.version > version:
                return self.table
            if time.monotonic() >= deadline:
                raise PoolUnavailableError(
                    f"a shard refused a training call, and no placement newer than {version} came"
                )
            await asyncio.sleep(timeouts.BACKOFF_S[0])

    async def _take(self) -> bool:
        """Take a router's publication. -> whether its spec or placement is newer."""
        try:
            got = await self._fetch()
        except ray.exceptions.RayError as e:
            raise PoolUnavailableError(f"no router answered: {e}") from None
        if got is None:
            raise PoolUnavailableError("the pool's routers are not configured yet")
        self._taken = time.monotonic()
        spec, table, handles = got["spec"], got["table"], got["handles"]
        changed = self.table is None or table.version > self.table.version or spec != self.spec
        if self.table is not None and table.version < self.table.version:
            return False  # a router behind the one we heard last
        same_shards = self.shards is not None and len(self.shards.handles) == len(handles)
        if not same_shards or spec.shards.transport != self.spec.shards.transport:
            self.shards = shard_calls(spec, list(handles))
        else:
            for n, h in enumerate(handles):  # a spare stands in, or the shard is back
                if h._actor_id != self.shards.handles[n]._actor_id:
                    self.shards.handles[n] = h
                    await self.shards.forget(n)
        self.spec, self.table = spec, table
        return changed
