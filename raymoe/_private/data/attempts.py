"""Running one batch's sub-batches to completion while shards fail or go silent (the
*dispatch* stage's failure rules, ``spec.faults``).

- A sub-batch whose shard *fails* (down, restarting, reloading) is split again away from
  that shard: its pairs go at once to other replicas of their experts; pairs with no other
  replica go to the same shard again after a backoff.
- A sub-batch whose shard stays *silent* past the hedge budget (``hedge_after_s``, and 4x
  both the slowest answered sub-batch of its batch and the router's typical call) is sent
  again to other replicas of its experts; the late call is dropped, so every partial sum is
  added once. Pairs whose every other replica was suspect then keep waiting, and are looked
  at again every ``REDIRECT_POLL_S``: they move as soon as one of those replicas is back.
  A shard on a node that died answers nothing until Ray declares the node dead (many
  seconds): the hedge is what keeps requests fast then.
- A shard that failed or went silent is *suspect* for ``suspect_s`` or until it answers:
  batches send it no pair another replica can take, so a dead node costs one hedge, not one
  per batch.
- A shard whose sub-batches another actor serves now (a spare standing in while its process
  restarts, :meth:`Attempts.redirected`): calls still waiting on the old actor (Ray holds
  them until it has restarted) are sent again, to the new one.
- Every replica of an expert unreachable: ``on_unreachable: fail`` waits for one until the
  request's deadline; ``degrade`` drops the pairs after ``degrade_after_s`` (hivemind's
  ``k_min`` rule) and the router renormalises their tokens' remaining weights.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from raymoe._private import timeouts
from raymoe._private.data.dispatch import DispatchTable, SubBatch, resplit, split_by_shard
from raymoe._private.metrics import Metrics, NullMetrics
from raymoe.config import FaultSpec
from raymoe.errors import DeadlineExceededError, PoolUnavailableError

HEDGE_FACTOR = 4.0  # a call is silent when it takes this many times a normal one
REDIRECT_POLL_S = 0.1  # how often a call past its hedge looks for a replica or actor again
TYPICAL_DECAY = 0.9  # of the moving average of answered calls' durations


class Suspects:
    """Shards that failed or went silent recently (shard -> until when)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._until: dict[int, float] = {}

    def mark(self, shard: int, for_s: float) -> None:
        self._until[shard] = self.clock() + for_s

    def clear(self, shard: int) -> None:
        self._until.pop(shard, None)

    def mask(self, num_shards: int) -> torch.Tensor | None:
        """[N] bool of the shards to route around now; None when there are none."""
        now = self.clock()
        live = [n for n, t in self._until.items() if t > now and n < num_shards]
        if not live:
            return None
        out = torch.zeros(num_shards, dtype=torch.bool)
        out[live] = True
        return out


@dataclass
class _Flight:
    sub: SubBatch
    sent: float  # when its call goes out (after any backoff)
    since: float | None  # when its pairs first got no answer (the degrade clock)
    hedged: bool = False  # past its hedge budget with nowhere else to go (so far)
    tries: int = 0  # failed attempts of the pairs it carries
    actor: int = 0  # generation of the actor serving its shard when it was sent
    looked: float = 0.0  # when its pairs were last looked at for another replica


@dataclass
class Outcome:
    """One batch's dispatch: the shards' partial sums, and the sub-batches dropped in
    degrade mode (their pairs were not computed)."""

    parts: list[tuple[SubBatch, torch.Tensor]] = field(default_factory=list)
    dropped: list[SubBatch] = field(default_factory=list)


Call = Callable[[SubBatch, float], Awaitable[np.ndarray]]  # (sub-batch, delay_s) -> [t, d]


class Attempts:
    """A router's dispatch rules; keeps what outlives one batch (the suspects, the typical
    call). ``counters`` gets ``retries``, ``hedges`` and ``dropped_pairs``, ``metrics``
    the first two."""

    def __init__(
        self,
        faults: FaultSpec,
        counters: dict,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.faults = faults
        self.counters = counters
        self.metrics = metrics or NullMetrics()
        self.clock = clock
        self.suspects = Suspects(clock)
        self.typical_s = 0.0
        self.actors: dict[int, int] = {}  # shard -> generation of the actor serving it

    def redirected(self, shard: int) -> None:
        """Another actor serves ``shard`` now: calls waiting on the old one go again."""
        self.actors[shard] = self.actors.get(shard, 0) + 1
        self.suspects.clear(shard)

    async def run(
        self,
        call: Call,
        retryable: Callable[[BaseException], bool],
        ids: torch.Tensor,
        weights: torch.Tensor,
        table: DispatchTable,
        deadline: float,
    ) -> Outcome:
        """Send ``ids`` / ``weights`` [T, S] split by shard and wait for every pair's answer
        (or its drop in degrade mode)."""
        run = _Run(self, call, retryable, table, deadline)
        try:
            return await run.until_done(ids, weights)
        finally:
            run.cancel()

    def answered(self, shard: int, took_s: float) -> None:
        self.suspects.clear(shard)
        t = self.typical_s
        self.typical_s = took_s if t == 0.0 else TYPICAL_DECAY * t + (1 - TYPICAL_DECAY) * took_s


class _Run:
    """One batch's sub-batches in flight."""

    def __init__(self, rules: Attempts, call: Call, retryable, table, deadline: float):
        self.rules, self.call, self.retryable = rules, call, retryable
        self.table, self.deadline = table, deadline
        self.faults = rules.faults
        self.clock = rules.clock
        self.pending: dict[asyncio.Future, _Flight] = {}
        self.out = Outcome()
        self.slowest = 0.0  # of this batch's answered calls
        self.backoff = timeouts.BACKOFF_S[0]

    async def until_done(self, ids, weights) -> Outcome:
        avoid = self.rules.suspects.mask(self.table.num_shards)
        self._send(split_by_shard(ids, weights, self.table, avoid), since=None)
        while self.pending:
            now = self.clock()
            if now >= self.deadline:
                raise DeadlineExceededError("shards unavailable until the request's deadline")
            wake = min(self.deadline, self._next_wake())
            done, _ = await asyncio.wait(
                list(self.pending), timeout=max(wake - now, 0.0), return_when="FIRST_COMPLETED"
            )
            for task in done:
                self._landed(task, self.pending.pop(task))
            now = self.clock()
            for task, flight in list(self.pending.items()):
                if flight.actor != self.rules.actors.get(flight.sub.shard, 0):
                    task.cancel()  # waiting on an actor its shard is no longer served by
                    del self.pending[task]
                    self._send([flight.sub], flight.since, tries=flight.tries)
                elif now - flight.sent >= self._budget() and (
                    not flight.hedged or now >= flight.looked + REDIRECT_POLL_S
                ):
                    self._hedge(task, flight)
                elif self._degrade_due(flight, now):
                    task.cancel()
                    del self.pending[task]
                    self._drop([flight.sub])
        return self.out

    def cancel(self) -> None:
        for task in self.pending:
            task.cancel()

    # --- events -------------------------------------------------------------------------

    def _landed(self, task: asyncio.Future, flight: _Flight) -> None:
        err = task.exception()
        if err is None:
            took = self.clock() - flight.sent
            self.slowest = max(self.slowest, took)
            self.rules.answered(flight.sub.shard, took)
            self.out.parts.append((flight.sub, torch.from_numpy(task.result())))
            return
        if not self.retryable(err):
            raise err
        tries = flight.tries + 1
        self.rules.counters["retries"] += 1
        self.rules.metrics.inc("raymoe_retries_total")
        if tries > timeouts.MAX_ATTEMPTS:
            raise PoolUnavailableError(
                f"shards still failing after {timeouts.MAX_ATTEMPTS} attempts"
            ) from err
        since = flight.since if flight.since is not None else self.clock()
        moved, stuck = self._away(flight.sub)
        self._send(moved, since, tries=tries)
        if not stuck:
            return
        if self._degrade_due(_Flight(flight.sub, 0.0, since), self.clock()):
            self._drop(stuck)
            return
        delay = self.backoff
        if self.faults.on_unreachable == "degrade":  # wake up in time to drop them
            delay = min(delay, max(since + self.faults.degrade_after_s - self.clock(), 0.0))
        if self.clock() + delay >= self.deadline:
            raise DeadlineExceededError("shards unavailable until the request's deadline")
        self._send(stuck, since, delay, tries=tries)
        self.backoff = min(2 * self.backoff, timeouts.BACKOFF_S[1])

    def _hedge(self, task: asyncio.Future, flight: _Flight) -> None:
        """``flight``'s shard is silent: its pairs go to other replicas where they have one
        (those without one are sent to it again, hedged, unless the call is kept)."""
        flight.hedged, flight.looked = True, self.clock()
        moved, stuck = self._away(flight.sub)
        if not moved:
            return  # no other replica: keep waiting for this call
        task.cancel()
        del self.pending[task]
        self.rules.counters["hedges"] += 1
        self.rules.metrics.inc("raymoe_hedges_total")
        since = flight.since if flight.since is not None else flight.sent
        self._send(moved, since, tries=flight.tries)
        self._send(stuck, since, hedged=True, tries=flight.tries)

    # --- helpers ------------------------------------------------------------------------

    def _away(self, sub: SubBatch) -> tuple[list[SubBatch], list[SubBatch]]:
        """``sub``'s pairs split again with its shard suspect: (those on shards not suspect,
        those whose every replica is)."""
        self.rules.suspects.mark(sub.shard, self.faults.suspect_s)
        avoid = self.rules.suspects.mask(self.table.num_shards)
        if avoid is None:  # suspect_s = 0: route around this shard for this batch only
            avoid = torch.zeros(self.table.num_shards, dtype=torch.bool)
            avoid[sub.shard] = True
        parts = resplit(sub, self.table, avoid)
        return [s for s in parts if not avoid[s.shard]], [s for s in parts if avoid[s.shard]]

    def _send(self, subs, since, delay=0.0, hedged=False, tries=0) -> None:
        actors = self.rules.actors
        for s in subs:
            task = asyncio.ensure_future(self.call(s, delay))
            at = self.clock() + delay
            self.pending[task] = _Flight(s, at, since, hedged, tries, actors.get(s.shard, 0), at)

    def _drop(self, subs: list[SubBatch]) -> None:
        self.out.dropped.extend(subs)
        self.rules.counters["dropped_pairs"] += sum(int((s.local_ids >= 0).sum()) for s in subs)

    def _budget(self) -> float:
        typical = max(self.slowest, self.rules.typical_s)
        return max(self.faults.hedge_after_s, HEDGE_FACTOR * typical)

    def _degrade_due(self, flight: _Flight, now: float) -> bool:
        if self.faults.on_unreachable != "degrade":
            return False
        since = flight.since if flight.since is not None else flight.sent
        return now - since >= self.faults.degrade_after_s

    def _next_wake(self) -> float:
        """When the next hedge, drop or look for a moved shard is due."""
        wake = float("inf")
        budget = self._budget()
        for f in self.pending.values():
            if not f.hedged:
                wake = min(wake, f.sent + budget)
            else:
                wake = min(wake, max(f.sent + budget, f.looked + REDIRECT_POLL_S))
            if self.faults.on_unreachable == "degrade":
                since = f.since if f.since is not None else f.sent
                wake = min(wake, since + self.faults.degrade_after_s)
        return wake


class Picker:
    """Which of a pool's routers a client (``PoolHandle``, the gateway) sends the next
    forward to, and when a call to one is *silent* (a router on a node that died answers
    nothing until Ray declares the node dead): round robin, skipping suspect routers; a
    call silent past :meth:`budget` is hedged once to another router (forward is
    idempotent) and its router is suspect for ``timeouts.SUSPECT_S``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.suspects = Suspects(clock)
        self._next = 0
        self.typical_s = 0.0  # moving averages of answered calls: seconds ...
        self.per_token_s = 0.0  # ... and seconds per token

    def pick(self, n: int, avoid: int | None = None) -> int:
        """The next router of ``n`` that is not suspect (nor ``avoid``), else the next."""
        mask = self.suspects.mask(n)
        for _ in range(n):
            i = self._next % n
            self._next += 1
            if i != avoid and (mask is None or not bool(mask[i])):
                return i
        i = self._next % n
        self._next += 1
        return (i + 1) % n if i == avoid and n > 1 else i

    def budget(self, tokens: int) -> float:
        """Seconds a call of ``tokens`` may take before it counts as silent."""
        typical = max(self.typical_s, tokens * self.per_token_s)
        return max(timeouts.ROUTER_HEDGE_S, HEDGE_FACTOR * typical)

    def answered(self, i: int, took_s: float, tokens: int) -> None:
        self.suspects.clear(i)
        per_token = took_s / max(tokens, 1)
        if self.typical_s == 0.0:
            self.typical_s, self.per_token_s = took_s, per_token
            return
        a = 1 - TYPICAL_DECAY
        self.typical_s += a * (took_s - self.typical_s)
        self.per_token_s += a * (per_token - self.per_token_s)

    def suspect(self, i: int) -> None:
        self.suspects.mark(i, timeouts.SUSPECT_S)
