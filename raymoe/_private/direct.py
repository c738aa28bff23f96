"""A trainer's own view of a pool's shards: its training calls go from its process straight
to the shards (:mod:`raymoe._private.data.training`), not through a router, so that each
tensor crosses one process boundary instead of two.

A router publishes the spec, the dispatch table of the placement version it serves and the
shard actors (:meth:`~raymoe._private.data.router.Router.published`); the view holds them,
and takes them again from a router when a shard refuses a call (the placement moved on) and
when a call names experts or layers it does not know yet (added since). Every ``REFRESH_S``
it also takes them in the background (replicas added, shards scaled), while calls go on
with what it holds: a router that is down or restarting stops no training call. Its calls
run on one event loop thread per process, shared by every view (the gRPC transport's
channels live there).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Awaitable, Callable

import ray

from raymoe._private import timeouts
from raymoe._private.pool_actors import shard_calls
from raymoe.errors import ExpertIdError, LayerIndexError, PoolUnavailableError

REFRESH_S = 1.0  # the most a view serves from a publication before taking a new one
SETUP_S = 60.0  # for a router to be up and configured, before the view knows the spec
FETCH_MIN_S = 0.5  # the least one router is given to answer

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
    publications. ``fetch()``: a coroutine, one router's :meth:`published` (the next
    router's at each call)."""

    def __init__(self, fetch: Callable[[], Awaitable[dict | None]]):
        self._fetch = fetch
        self.spec = self.table = self.shards = None
        self._taken = -float("inf")  # when the view was last taken
        self._refresh: asyncio.Future | None = None  # a publication being taken meanwhile

    def run(self, fn, *args, timeout_s: float | None = None):
        """``fn(view, *args, timeout_s)`` (a coroutine function of :mod:`.training`) on the
        event loop thread; -> its result. ``timeout_s`` at most the spec's
        ``limits.request_timeout_s``."""
        done = asyncio.run_coroutine_threadsafe(self._run(fn, args, timeout_s), _event_loop())
        return done.result()

    async def _run(self, fn, args, timeout_s):
        start = time.monotonic()
        if self.spec is None:
            await self._take(start + (timeout_s or SETUP_S))
        elif start - self._taken > REFRESH_S and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self._take_quietly())  # calls go on meanwhile
        limit = self.spec.limits.request_timeout_s
        timeout = min(timeout_s or limit, limit)
        try:
            return await fn(self, *args, timeout)
        except (ExpertIdError, LayerIndexError):
            if not await self._take(start + timeout):  # nothing new: the call is wrong
                raise
            return await fn(self, *args, timeout)  # experts or layers added since

    def close(self) -> None:
        """Close what the view holds open (the gRPC transport's channels)."""
        shards = self.shards
        if shards is not None:
            self.shards = None
            asyncio.run_coroutine_threadsafe(_forget_all(shards), _event_loop()).result()

    async def newer(self, version: int, deadline: float):
        """(table, shards) of a placement version above ``version``, taken from a router as
        soon as one publishes it; :class:`PoolUnavailableError` past ``deadline``."""
        while True:
            await self._take(deadline)
            if self.table.version > version:
                return self.table, self.shards
            if time.monotonic() >= deadline:
                raise PoolUnavailableError(
                    f"a shard refused a training call, and no placement newer than {version} came"
                )
            await asyncio.sleep(timeouts.BACKOFF_S[0])

    async def _take_quietly(self) -> None:
        """:meth:`_take` for a view that still serves: a router down or slow now leaves it
        as it is."""
        self._taken = time.monotonic()  # one refresh a REFRESH_S, answered or not
        with contextlib.suppress(PoolUnavailableError):
            await self._take(time.monotonic())

    async def _take(self, deadline: float) -> bool:
        """Take a router's publication, waiting (bounded by ``deadline``) for a router that
        is up and configured (one restarting is configured by the controller again).
        -> whether its spec or placement is newer than the view's."""
        for attempt in itertools.count():
            try:  # NOTE: a call to a restarting router waits for it: bounded here
                wait = max(deadline - time.monotonic(), FETCH_MIN_S)
                got = await asyncio.wait_for(self._fetch(), wait)
            except (ray.exceptions.RayError, TimeoutError):
                got = None  # that router is down or restarting: the next is asked
            if got is not None:
                break
            if time.monotonic() >= deadline:
                raise PoolUnavailableError("no router of the pool is up and configured")
            await asyncio.sleep(min(timeouts.BACKOFF_S[0] * 2**attempt, timeouts.BACKOFF_S[1]))
        self._taken = time.monotonic()
        spec, table, handles = got["spec"], got["table"], got["handles"]
        if self.table is not None and table.version < self.table.version:
            return False  # a router behind the one heard last
        changed = self.table is None or table.version > self.table.version or spec != self.spec
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


async def _forget_all(shards) -> None:
    await asyncio.gather(*(shards.forget(n) for n in range(len(shards.handles))))
