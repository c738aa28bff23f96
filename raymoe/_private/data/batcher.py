"""The router's bounded request queue and the loop that coalesces requests into batches.

On an idle router a request leaves at once; on a busy one (a batch already computing) it
waits up to ``limits.max_wait_ms`` for company. A batch holds at most
``limits.max_batch_tokens`` tokens; at most ``MAX_INFLIGHT_BATCHES`` run at once; beyond
``limits.max_queued_requests`` waiting requests a caller gets :class:`PoolOverloadedError`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from raymoe.config import LimitsSpec
from raymoe.errors import PoolOverloadedError

MAX_INFLIGHT_BATCHES = 2  # one batch computing on shards while the next one is gated


@dataclass
class Request:
    """One caller's forward pass, validated, waiting for its rows."""

    x: torch.Tensor  # the caller's tensor, [..., d]
    flat: torch.Tensor  # [T, d]
    expert_ids: torch.Tensor | None
    weights: torch.Tensor | None
    token_ids: torch.Tensor | None
    deadline: float
    future: asyncio.Future
    layer: int = 0  # the MoE layer of a multi-layer pool
    started: float = field(default_factory=time.perf_counter)
    degraded: int = 0  # rows served without some of their experts (degrade mode)

    @property
    def tokens(self) -> int:
        return self.flat.shape[0]


class Batcher:
    """Queue + batching loop; ``run`` computes one batch (a coroutine per batch)."""

    def __init__(self, limits: LimitsSpec, run: Callable[[list[Request]], Awaitable[None]]):
        self.limits = limits
        self.run = run
        self.queue: collections.deque[Request] = collections.deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_INFLIGHT_BATCHES)
        self.inflight = 0
        self._loop: asyncio.Task | None = None

    def submit(self, req: Request) -> None:
        """Queue ``req``; :class:`PoolOverloadedError` when the queue is full."""
        if len(self.queue) >= self.limits.max_queued_requests:
            raise PoolOverloadedError(
                f"router queue is full ({self.limits.max_queued_requests} requests); retry later"
            )
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._batch_loop())
        self.queue.append(req)
        self._wakeup.set()

    async def _batch_loop(self) -> None:
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            if self.inflight and self.limits.max_wait_ms > 0:
                await self._wait_for_company()
            batch = self._take()
            self.inflight += 1
            task = asyncio.get_running_loop().create_task(self.run(batch))
            task.add_done_callback(self._done)

    async def _wait_for_company(self) -> None:
        # NOTE: busy: wait a little for more requests to share this batch. Idle: go now.
        end = time.monotonic() + self.limits.max_wait_ms / 1000
        while _tokens(self.queue) < self.limits.max_batch_tokens:
            left = end - time.monotonic()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[Request]:
        batch = [self.queue.popleft()]
        total = batch[0].tokens
        while self.queue and total + self.queue[0].tokens <= self.limits.max_batch_tokens:
            total += self.queue[0].tokens
            batch.append(self.queue.popleft())
        return batch

    def _done(self, _task) -> None:
        self.inflight -= 1
        self._slots.release()


def _tokens(queue) -> int:
    return sum(r.tokens for r in queue)
