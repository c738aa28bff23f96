"""Router: the plain asyncio class behind a router actor (``ray.remote`` is applied in actors.py).

A request is validated in its caller's coroutine (bad input fails that caller only), then
queued. One batching loop coalesces queued requests into batches bounded by
``max_batch_tokens``; on an idle router a request leaves at once, on a busy one it waits up to
``max_wait_ms`` for company. Each batch is gated (token-wise gates on the whole batch,
batch-coupled gates such as capacity routing per request, so results never depend on who else
was in the batch), split into one sub-batch per shard under one placement version, sent
through a :class:`ShardCalls` transport, and combined; each caller gets its own rows back.

A sub-batch that fails because its shard died or is reloading goes to another replica of its
experts where there is one, else to the same shard again once it is back, until the request's
deadline. Tensors cross actor boundaries as numpy arrays.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from raymoe._private.dispatch import SubBatch, combine, split_by_shard
from raymoe._private.placement import Placement
from raymoe.config import PoolSpec
from raymoe.errors import (
    DeadlineExceededError,
    PoolOverloadedError,
    PoolUnavailableError,
)
from raymoe.layer import MoELayer
from raymoe.validation import check_hidden

MAX_INFLIGHT_BATCHES = 2  # one batch computing on shards while the next one is gated
MAX_ATTEMPTS = 64  # per sub-batch, bounded further by the deadline
BACKOFF_S = (0.005, 0.5)  # first and largest wait between attempts
WINDOW = 4096  # requests kept for latency and throughput statistics
INLINE_TOKENS = 256  # batches smaller than this are gated and combined on the event loop


class ShardCalls(Protocol):
    """The transport to shards (Ray object store by default)."""

    async def compute(
        self, shard: int, x: np.ndarray, local_ids: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        """Shard ``shard`` computes (x [t, d], local ids [t, S], weights [t, S]) -> [t, d]."""
        ...

    def retryable(self, error: BaseException) -> bool:
        """Whether ``error`` means the shard is down or reloading (worth another attempt)."""
        ...


@dataclass
class _Request:
    x: torch.Tensor  # the caller's tensor, [..., d]
    flat: torch.Tensor  # [T, d]
    expert_ids: torch.Tensor | None
    weights: torch.Tensor | None
    token_ids: torch.Tensor | None
    deadline: float
    future: asyncio.Future
    started: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return self.flat.shape[0]


class Router:
    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.layer = MoELayer(spec, experts=False).eval()
        self.shards: ShardCalls | None = None
        self.placement: Placement | None = None
        self.routing_version = 0  # placement version that last changed spec or gate weights
        self._ready = asyncio.Event()
        self._queue: collections.deque[_Request] = collections.deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_INFLIGHT_BATCHES)
        self._inflight = 0
        self._loop_task: asyncio.Task | None = None
        self._outstanding: torch.Tensor | None = None  # tokens in flight per shard
        self._window: collections.deque = collections.deque(maxlen=WINDOW)
        self._batches: collections.deque = collections.deque(maxlen=WINDOW)
        self._counters = collections.Counter()
        self._stage_s = collections.Counter()  # seconds spent per stage of the data path
        self._running = collections.Counter()  # placement version -> batches running under it
        self._expert_load = torch.zeros(spec.num_experts, dtype=torch.int64)
        self._load_lock = threading.Lock()  # batches are gated in worker threads
        self._shard_load = torch.zeros(0, dtype=torch.int64)

    # --- control plane ------------------------------------------------------------------

    def configure(
        self,
        shards: ShardCalls,
        placement: Placement,
        weights: dict[str, np.ndarray] | None = None,
        spec: PoolSpec | None = None,
        routing_version: int = 0,
    ) -> None:
        """Attach shards, a placement and the gate / shared-expert weights; ready to serve."""
        self.shards = shards
        self.placement = None  # a reconfigure may go back in versions (a fresh controller)
        self.set_placement(placement, spec or self.spec, weights or {}, routing_version)
        self._ready.set()

    def set_placement(
        self,
        placement: Placement,
        spec: PoolSpec | None = None,
        weights: dict[str, np.ndarray] | None = None,
        routing_version: int | None = None,
    ) -> None:
        """Batches dispatched from now on use ``placement``; running ones keep theirs.

        Routing state that grows or shrinks with the experts (``spec``: the expert count and
        the removed ids; ``weights``: the gate, absent = keep the current one's) changes in
        the same step, so a batch gates and dispatches under one version of both."""
        if self.placement is not None and placement.version < self.placement.version:
            return  # an old publication arriving late
        n = placement.num_shards
        if self._outstanding is None or len(self._outstanding) != n:
            self._outstanding = torch.zeros(n)
            self._shard_load = torch.zeros(n, dtype=torch.int64)
        if spec is not None:
            layer = MoELayer(spec, experts=False).eval()
            own = layer.state_dict()
            state = weights if weights else self.layer.state_dict()
            if weights or spec.num_experts == self.spec.num_experts:
                layer.load_state_dict(
                    {k: torch.as_tensor(np.asarray(v)) for k, v in state.items() if k in own},
                    strict=True,
                )  # fmt: skip
            with self._load_lock:
                load = torch.zeros(spec.num_experts, dtype=torch.int64)
                m = min(len(load), len(self._expert_load))
                load[:m] = self._expert_load[:m]
                self._expert_load = load
            self.spec, self.layer = spec, layer
            self.routing_version = placement.version if routing_version is None else routing_version
        self.placement = placement

    def gate_weights(self) -> dict[str, np.ndarray]:
        """The gate and shared-expert weights (what a restarted controller re-publishes)."""
        return {k: v.detach().numpy().copy() for k, v in self.layer.state_dict().items()}

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # --- data plane ---------------------------------------------------------------------

    async def forward(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        token_ids: np.ndarray | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """``x`` [..., d] -> [..., d]; optional client routes [T, S] or token ids [T]."""
        limits = self.spec.limits
        timeout = min(timeout_s or limits.request_timeout_s, limits.request_timeout_s)
        deadline = time.monotonic() + timeout
        req = self._check(x, expert_ids, weights, token_ids, deadline)
        if req.tokens == 0:
            return np.zeros(req.x.shape, dtype=np.asarray(x).dtype)
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise PoolUnavailableError("the router has no shards configured yet") from None
        if len(self._queue) >= limits.max_queued_requests:
            self._counters["rejected"] += 1
            raise PoolOverloadedError(
                f"router queue is full ({limits.max_queued_requests} requests); retry later"
            )
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        self._queue.append(req)
        self._wakeup.set()
        try:
            out = await asyncio.wait_for(asyncio.shield(req.future), deadline - time.monotonic())
        except TimeoutError:
            self._counters["deadline_exceeded"] += 1
            raise DeadlineExceededError(f"request not served within {timeout:.3g} s") from None
        self._window.append((time.monotonic(), req.tokens, time.perf_counter() - req.started))
        return out

    def _check(self, x, expert_ids, weights, token_ids, deadline) -> _Request:
        spec = self.spec
        xt = _tensor(x)
        T = check_hidden(
            xt, d_model=spec.d_model, dtype=spec.torch_dtype,
            allow_nonfinite=spec.limits.allow_nonfinite,
            max_tokens=spec.limits.max_request_tokens,
        )  # fmt: skip
        flat = xt.reshape(T, spec.d_model)
        ids, w, tok = _tensor(expert_ids), _tensor(weights), _tensor(token_ids)
        self.layer.check_route_inputs(flat, xt, token_ids=tok, expert_ids=ids, weights=w)
        fut = asyncio.get_running_loop().create_future()
        return _Request(xt, flat, ids, w, tok, deadline, fut)

    async def _batch_loop(self) -> None:
        limits = self.spec.limits
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            if self._inflight and limits.max_wait_ms > 0:
                # NOTE: busy: wait a little for more requests to share this batch. Idle: go now.
                end = time.monotonic() + limits.max_wait_ms / 1000
                while _tokens(self._queue) < limits.max_batch_tokens:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except TimeoutError:
                        break
            batch = [self._queue.popleft()]
            total = batch[0].tokens
            while self._queue and total + self._queue[0].tokens <= limits.max_batch_tokens:
                total += self._queue[0].tokens
                batch.append(self._queue.popleft())
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            task.add_done_callback(self._batch_done)

    def _batch_done(self, _task) -> None:
        self._inflight -= 1
        self._slots.release()

    async def drained(self, version: int, timeout_s: float) -> bool:
        """Wait until no batch runs under a placement older than ``version`` (make before
        break: the controller frees old places only then); False on timeout."""
        end = time.monotonic() + timeout_s
        while any(v < version for v, n in self._running.items() if n):
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.005)
        return True

    def take_load(self) -> np.ndarray:
        """Tokens routed to each expert since the last call ([E] int64); resets the counts."""
        with self._load_lock:
            out = self._expert_load.numpy().copy()
            self._expert_load.zero_()
        return out

    async def _run_batch(self, batch: list[_Request]) -> None:
        placement, layer = self.placement, self.layer  # the one version this batch runs under
        self._running[placement.version] += 1
        try:
            await self._run_batch_under(batch, placement, layer)
        finally:
            self._running[placement.version] -= 1

    async def _run_batch_under(self, batch: list[_Request], placement: Placement, layer) -> None:
        batch = [r for r in batch if not r.future.done() and _still_valid(r, layer)]
        if not batch:
            return
        try:
            t0 = time.perf_counter()
            flat, ids, w = await self._offload(self._route, batch, layer)
            t1 = time.perf_counter()
            deadline = max(r.deadline for r in batch)
            parts = await self._dispatch(flat, ids, w, placement, deadline)
            t2 = time.perf_counter()
            y = await self._offload(self._combine, flat, parts)
            stages = self._stage_s
            stages["route"] += t1 - t0
            stages["dispatch"] += t2 - t1
            stages["combine"] += time.perf_counter() - t2
        except BaseException as e:  # every caller of the batch hears about it
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e if isinstance(e, Exception) else RuntimeError(e))
            if not isinstance(e, Exception):
                raise
            return
        self._batches.append(flat.shape[0])
        self._counters["batches"] += 1
        start = 0
        for r in batch:
            out = y[start : start + r.tokens].reshape(r.x.shape)
            start += r.tokens
            if not r.future.done():
                r.future.set_result(out.numpy())

    async def _offload(self, fn, batch_or_flat, *args):
        """Run ``fn`` in a worker thread for big batches (the loop keeps taking requests
        meanwhile); inline for small ones, where the thread hand-off would cost more."""
        first = batch_or_flat
        tokens = first.shape[0] if isinstance(first, torch.Tensor) else _tokens(first)
        if tokens < INLINE_TOKENS:
            return fn(batch_or_flat, *args)
        return await asyncio.to_thread(fn, batch_or_flat, *args)

    @torch.no_grad()
    def _route(self, batch: list[_Request], layer: MoELayer):
        """(flat [T, d], ids [T, S], weights [T, S]) of the whole batch, in request order."""
        flat = torch.cat([r.flat for r in batch]) if len(batch) > 1 else batch[0].flat
        routes: list = [None] * len(batch)
        gated = []
        for i, r in enumerate(batch):
            if r.expert_ids is not None:
                routes[i] = (r.expert_ids.long(), r.weights.to(torch.float32))
            elif layer.router.batch_coupled:
                rt = layer.route(r.flat, r.x, token_ids=r.token_ids)
                routes[i] = (rt.ids, rt.weights)
            else:
                gated.append(i)
        if gated:
            # token-wise gates: one gating call for all of them (batched routing matmuls)
            xs = torch.cat([batch[i].flat for i in gated])
            tok = None
            if layer.router.needs_token_ids:
                tok = torch.cat([batch[i].token_ids for i in gated])
            rt = layer.route(xs, xs, token_ids=tok)
            for i, (a, b) in zip(gated, _chunks(rt.ids, rt.weights, batch, gated), strict=True):
                routes[i] = (a, b)
        S = max(a.shape[1] for a, _ in routes)
        ids = torch.cat([_pad(a, S, -1) for a, _ in routes])
        w = torch.cat([_pad(b, S, 0.0) for _, b in routes])
        valid = ids[ids >= 0]
        with self._load_lock:  # O(pairs), not O(experts)
            self._expert_load.index_put_((valid,), torch.ones_like(valid), accumulate=True)
        return flat, ids, w

    async def _dispatch(self, flat, ids, w, placement: Placement, deadline: float):
        """Run every sub-batch to completion (retrying failed ones); -> (tokens, partial)."""
        shards = self.shards
        avoid = torch.zeros(placement.num_shards, dtype=torch.bool)
        todo = split_by_shard(ids, w, placement, self._outstanding)
        parts: list[tuple[SubBatch, torch.Tensor]] = []
        backoff = BACKOFF_S[0]
        for _ in range(MAX_ATTEMPTS):
            results = await asyncio.gather(
                *(self._call(sub, flat) for sub in todo), return_exceptions=True
            )
            failed = []
            for sub, res in zip(todo, results, strict=True):
                if not isinstance(res, BaseException):
                    parts.append((sub, torch.from_numpy(res)))
                elif shards.retryable(res):
                    failed.append(sub)
                    avoid[sub.shard] = True
                else:
                    raise res
            if not failed:
                return parts
            self._counters["retries"] += len(failed)
            if time.monotonic() + backoff >= deadline:
                raise DeadlineExceededError("shards unavailable until the request's deadline")
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, BACKOFF_S[1])
            todo = [s for sub in failed for s in _resplit(sub, placement, avoid)]
        raise PoolUnavailableError(f"shards still failing after {MAX_ATTEMPTS} attempts")

    async def _call(self, sub: SubBatch, flat: torch.Tensor) -> np.ndarray:
        n, t = sub.shard, sub.tokens.numel()
        self._outstanding[n] += t
        self._shard_load[n] += int((sub.local_ids >= 0).sum())
        try:
            return await self.shards.compute(
                n, flat[sub.tokens].numpy(), sub.local_ids.numpy(),
                sub.weights.to(torch.float32).numpy(),
            )  # fmt: skip
        finally:
            self._outstanding[n] -= t

    @torch.no_grad()
    def _combine(self, flat, parts) -> torch.Tensor:
        y = combine(flat.shape[0], self.spec.d_model, parts, flat)
        return y + self.layer.shared_output(flat)

    # --- introspection ------------------------------------------------------------------

    def describe(self) -> dict:
        p = self.placement
        out = {"ready": self.ready, "placement_version": p.version if p else None,
               "routing_version": self.routing_version}  # fmt: skip
        if p is not None:
            out["shards"] = p.num_shards
            out["experts_per_shard"] = np.bincount(p.shard.numpy(), minlength=p.num_shards).tolist()
        return out

    def stats(self, reset_load: bool = False) -> dict:
        """Recent requests (end time, tokens, latency), batch sizes, counters and loads."""
        out = {
            "requests": list(self._window),
            "batch_tokens": list(self._batches),
            "counters": dict(self._counters),
            "stage_s": dict(self._stage_s),
            "queued": len(self._queue),
            "shard_load": self._shard_load.numpy().copy(),
        }
        with self._load_lock:
            out["expert_load"] = self._expert_load.numpy().copy()
            if reset_load:
                self._expert_load.zero_()
        if reset_load:
            self._shard_load.zero_()
        return out


def _still_valid(r: _Request, layer: MoELayer) -> bool:
    """False (and the caller told why) when ``r``'s client routes name experts removed after
    it was admitted."""
    if r.expert_ids is None or layer.router.removed is None:
        return True
    try:
        layer.check_route_inputs(r.flat, r.x, expert_ids=r.expert_ids, weights=r.weights)
    except Exception as e:
        r.future.set_exception(e)
        return False
    return True


def _resplit(sub: SubBatch, placement, avoid) -> list[SubBatch]:
    """The pairs of a failed ``sub`` split again, away from ``avoid``ed shards where possible."""
    return [
        SubBatch(s.shard, sub.tokens[s.tokens], s.local_ids, s.weights, s.expert_ids)
        for s in split_by_shard(sub.expert_ids, sub.weights, placement, avoid=avoid)
    ]


def _chunks(ids, weights, batch, gated):
    start = 0
    for i in gated:
        t = batch[i].tokens
        yield ids[start : start + t], weights[start : start + t]
        start += t


def _pad(a: torch.Tensor, S: int, value) -> torch.Tensor:
    if a.shape[1] == S:
        return a
    return torch.nn.functional.pad(a, (0, S - a.shape[1]), value=value)


def _tokens(queue) -> int:
    return sum(r.tokens for r in queue)


def _tensor(a):
    if a is None or isinstance(a, torch.Tensor):
        return a
    if not isinstance(a, np.ndarray):
        return a  # let validation name the wrong type
    return torch.from_numpy(np.ascontiguousarray(a))
