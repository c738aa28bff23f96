"""A caller's own view of a pool's shards: its training calls, and its small requests, go
from its process straight to the shards (:mod:`raymoe._private.data.training`,
:mod:`raymoe._private.data.direct_forward`), not through a router, so that each tensor
crosses one process boundary instead of two.

A router publishes the spec, the dispatch table of the placement version it serves and the
shard actors (:meth:`~raymoe._private.data.router.Router.published`); the view holds them,
and takes them again from a router when a shard refuses a call (the placement moved on) and
when a call names experts or layers it does not know yet (added since). Every ``REFRESH_S``
it also takes them in the background (replicas added, shards scaled), while calls go on
with what it holds: a router that is down or restarting stops no training call. Its calls
run on one event loop thread per process, shared by every view (the gRPC transport's
channels live there).

Small requests (at most ``limits.direct_max_tokens`` tokens) run in the caller's own thread,
one at a time per view: more at once go through a router, which batches them. What they
routed is counted and handed to a router with the next publication it is asked for (within
``REFRESH_S``, more requests or not), so the load the controller balances includes them.
One that misses (a refusal, a shard down or slow past ``faults.hedge_after_s``) goes
through a router; after a miss that was not a refusal, every request does for
``faults.suspect_s``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np
import ray
import torch

from raymoe._private import timeouts
from raymoe._private.data import direct_forward
from raymoe._private.data.direct_forward import Missed, Publication
from raymoe._private.pool_actors import blocking_shard_calls, shard_calls
from raymoe.errors import ExpertIdError, LayerIndexError, PoolUnavailableError

REFRESH_S = 1.0  # the most a view serves from a publication before taking a new one
SETUP_S = 60.0  # for a router to be up and configured, before the view knows the spec
FETCH_MIN_S = 0.5  # the least one router is given to answer
MAX_PENDING_PAIRS = 1 << 20  # direct requests' pairs held before they are counted up

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
    publications. ``fetch(gates_of, traffic)``: a coroutine, one router's :meth:`published`
    (the next router's at each call)."""

    def __init__(self, fetch: Callable[[int | None, dict | None], Awaitable[dict | None]]):
        self._fetch = fetch
        self.spec = self.table = self.shards = None
        self.now: Publication | None = None  # what small requests use, held together
        self._taken = -float("inf")  # when the view was last taken
        self._refresh = None  # a publication being taken meanwhile (a future)
        self._calls = None  # blocking transport for small requests
        self._seen: Publication | None = None  # the publication the transport was pruned for
        self._one = threading.Lock()  # one small request at a time
        self._cold_until = 0.0  # no small requests before this (after a shard failed one)
        self._traffic = _Traffic()
        self.stage_s: collections.Counter = collections.Counter()  # small requests' stages, and n

    def may_serve(self, tokens: int) -> bool:
        """Whether :meth:`serve` would try a request of ``tokens`` now (the view taken, not
        cold after a failure, the request small enough, no other one running); takes a
        new publication when the view's is due."""
        now = self.now
        if now is None or time.monotonic() - self._taken > REFRESH_S:
            self._take_soon()
        if now is None or time.monotonic() < self._cold_until or self._one.locked():
            return False
        return tokens <= now.spec.limits.direct_max_tokens

    def serve(self, x, expert_ids, weights, token_ids, layer: int, timeout_s: float | None):
        """A small request straight to the shards, in the caller's thread -> the output
        (numpy), or None: a router is to serve it (too big, another one running, the view
        not taken yet, or it missed)."""
        if not self.may_serve(int(np.prod(np.shape(x)[:-1]))):
            return None
        if not self._one.acquire(blocking=False):
            return None
        now, limits = self.now, self.now.spec.limits
        try:
            if (
                self._calls is None
                or self._seen is None
                or now.spec.shards.transport != self._seen.spec.shards.transport
            ):
                if self._calls is not None:
                    self._calls.close()
                self._calls = blocking_shard_calls(now.spec)
            if now is not self._seen:
                self._calls.keep_only(now.handles)
                self._seen = now
            wait = min(now.spec.faults.hedge_after_s, timeout_s or limits.request_timeout_s)
            start = time.perf_counter()
            with _one_thread():
                y, routed = direct_forward.forward(
                    now, self._calls, x, expert_ids, weights, token_ids, layer, wait
                )
        except Missed as e:
            if not isinstance(e.cause, Exception) or not self._calls.refused(e.cause):
                self._cold_until = time.monotonic() + now.spec.faults.suspect_s
            self._take_soon(force=True)
            return None
        finally:
            self._one.release()
        if not self._traffic.pending():  # handed over within REFRESH_S, more requests or not
            loop = _event_loop()
            loop.call_soon_threadsafe(loop.call_later, REFRESH_S, self._take_soon)
        self._traffic.add(routed, y.shape, time.perf_counter() - start)
        self.stage_s.update(routed.stages)
        self.stage_s["n"] += 1
        return y

    def flush(self, timeout_s: float = timeouts.STATUS_S) -> None:
        """Hand what this view's small requests routed to a router now (bounded; a router
        that does not take it leaves it for the next refresh)."""
        end = time.monotonic() + timeout_s
        for _ in range(2):  # a refresh under way took some, and this call takes the rest
            refresh = self._refresh
            if refresh is not None and not refresh.done():
                with contextlib.suppress(Exception):
                    refresh.result(max(end - time.monotonic(), 0.0))
            if self.now is None or not self._traffic.pending():
                return
            self._take_soon(force=True)

    def _take_soon(self, force: bool = False) -> None:
        """Take a new publication in the background (unless one is being taken)."""
        if self._refresh is not None and not self._refresh.done():
            return
        if force:
            self._taken = -float("inf")
        self._refresh = asyncio.run_coroutine_threadsafe(self._take_quietly(), _event_loop())

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
        elif start - self._taken > REFRESH_S:
            self._take_soon()  # calls go on meanwhile
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
        shards, calls = self.shards, self._calls
        self.shards = self.now = self._calls = None
        if shards is not None:
            asyncio.run_coroutine_threadsafe(_forget_all(shards), _event_loop()).result()
        if calls is not None:
            with self._one:
                calls.close()

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
        gates_of = self.now.routing_version if self.now is not None else None
        traffic = self._traffic.take()  # NOTE: lost if no router takes it (stats only)
        for attempt in itertools.count():
            try:  # NOTE: a call to a restarting router waits for it: bounded here
                wait = max(deadline - time.monotonic(), FETCH_MIN_S)
                got = await asyncio.wait_for(self._fetch(gates_of, traffic), wait)
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
        gates = got["gates"] if got["gates"] is not None else self.now.gates
        self.now = Publication(spec, table, list(handles), gates, got["routing_version"])
        return changed


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread in this thread meanwhile (thread-local: OpenMP's and MKL's
    settings; threads that first use torch meanwhile start with one too). A small request's
    ops (an ``index_add_`` of 16 rows) still go parallel, and the idle OpenMP threads then
    spin for ~4 ms of a core (measured here), a core the pool's shards on this machine
    were waiting for."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Traffic:
    """What a view's small requests routed, until a router is handed it (bounded: the
    pairs are counted up per expert past ``MAX_PENDING_PAIRS``, the requests' latencies
    are the last 4096)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._counted = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # (experts, pairs)
        self._experts: list[np.ndarray] = []  # one entry per pair, not counted up yet
        self._pending = 0
        self._shard_pairs = np.zeros(0, np.int64)
        self._requests: collections.deque = collections.deque(maxlen=4096)

    def add(self, routed: direct_forward.Routed, shape: tuple, seconds: float) -> None:
        with self._lock:
            self._experts.append(routed.experts)
            self._pending += len(routed.experts)
            if self._pending > MAX_PENDING_PAIRS:
                self._counted, self._experts, self._pending = self._count(), [], 0
            n = len(routed.shard_pairs)
            if len(self._shard_pairs) < n:
                self._shard_pairs = np.pad(self._shard_pairs, (0, n - len(self._shard_pairs)))
            self._shard_pairs[:n] += routed.shard_pairs
            self._requests.append((int(np.prod(shape[:-1])), seconds))

    def pending(self) -> bool:
        return bool(self._requests)

    def take(self) -> dict | None:
        """-> :meth:`RouterStats.served_directly`'s arguments (None: nothing since)."""
        with self._lock:
            if not self._requests:
                return None
            experts, pairs = self._count()
            out = {
                "experts": experts,
                "pairs": pairs,
                "shard_pairs": self._shard_pairs,
                "latency_s": list(self._requests),
            }
            self._clear()
            return out

    def _count(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate([self._counted[0], *self._experts])
        each = np.concatenate([self._counted[1], np.ones(self._pending, np.int64)])
        experts, where = np.unique(ids, return_inverse=True)
        return experts, np.bincount(where, weights=each, minlength=len(experts)).astype(np.int64)


async def _forget_all(shards) -> None:
    await asyncio.gather(*(shards.forget(n) for n in range(len(shards.handles))))
