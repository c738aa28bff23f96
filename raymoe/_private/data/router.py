"""Router: the plain asyncio class behind a router actor (``ray.remote`` is applied in actors.py).

The data path of one batch, as named stages (vLLM's modular MoE kernel):

1. *route*: gate the batch (token-wise gates on the whole batch; batch-coupled gates such as
   capacity routing per request, so results never depend on who else was in the batch), or
   take the callers' own routes;
2. *dispatch*: split into one sub-batch per shard under one placement version
   (:mod:`.dispatch`) and send them through a :class:`ShardCalls` transport; a sub-batch
   whose shard died, is reloading or is silent goes to another replica of its experts
   where there is one, else to the same shard once it is back, until the request's
   deadline, or is dropped in degrade mode (:mod:`.attempts`, ``spec.faults``);
3. *combine*: scatter-add the shards' partial sums (renormalised on rows that lost
   experts in degrade mode), add the shared experts; each caller gets its own rows.

Requests are validated in their caller's coroutine (bad input fails that caller only) and
coalesced by a :class:`.batcher.Batcher`. Tensors cross actor boundaries as numpy arrays.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Protocol

import numpy as np
import torch

from raymoe._private.data.attempts import Attempts
from raymoe._private.data.batcher import Batcher, Request
from raymoe._private.data.dispatch import DispatchTable, SubBatch, digest_of
from raymoe._private.data.gates import Gates
from raymoe._private.data.stages import (
    checked,
    combine_rows,
    renormalise,
    route_batch,
    spans_of,
    still_valid,
)
from raymoe._private.data.stats import RouterStats
from raymoe._private.metrics import Metrics, NullMetrics
from raymoe.config import PoolSpec
from raymoe.errors import DeadlineExceededError, PoolUnavailableError
from raymoe.placement import Placement

INLINE_TOKENS = 256  # batches smaller than this are gated and combined on the event loop


class ShardCalls(Protocol):
    """The transport to shards (Ray object store or gRPC); ``handles[n]`` is the actor
    that shard ``n``'s sub-batches go to."""

    handles: list

    async def compute(
        self,
        shard: int,
        x: np.ndarray,
        local_ids: np.ndarray,
        weights: np.ndarray,
        digest: int,
        keep: int | None = None,
    ) -> np.ndarray:
        """Shard ``shard`` computes (x [t, d], local ids [t, S], weights [t, S]) -> [t, d];
        ``digest`` (:func:`~.dispatch.places_digest`) names the experts meant; ``keep``: a
        training forward's key (the shard keeps its activations for the backward)."""
        ...

    def retryable(self, error: BaseException) -> bool:
        """Whether ``error`` means the shard is down or reloading (worth another attempt)."""
        ...

    def refused(self, error: BaseException) -> bool:
        """Whether ``error`` is a shard's refusal, before doing any of the call: it is
        reloading, or its places hold other experts than the call means."""
        ...

    async def backward(
        self, shard: int, x, local_ids, weights, grad_y, digest: int, keep: int | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The backward of :meth:`compute` for ``grad_y`` -> (grad of x, grad of weights);
        None when ``x`` and ``weights`` are None and the shard kept no forward ``keep``."""
        ...

    async def forget(self, shard: int) -> None:
        """``handles[shard]`` changed: drop what was kept for the old one (a channel)."""
        ...


class Router:
    def __init__(self, spec: PoolSpec, metrics: Metrics | None = None, index: int = 0):
        self.spec = spec
        self.metrics = metrics or NullMetrics()
        self.index = index
        self.gates = Gates(spec)
        self.shards: ShardCalls | None = None
        self.table: DispatchTable | None = None
        self.routing_version = 0  # placement version that last changed spec or gate weights
        self.stand_ins: dict[int, int] = {}  # shard -> the spare its sub-batches go to
        self._ready = asyncio.Event()
        self.batcher = Batcher(spec.limits, self._run_batch)
        self.traffic = RouterStats(spec.num_experts, spec.shards.count)
        self.attempts = Attempts(spec.faults, self.traffic.counters, self.metrics)
        self._running = collections.Counter()  # placement version -> batches running under it
        self._stage_s = collections.Counter()  # seconds spent per stage of the data path

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
        self._own = list(shards.handles)  # each shard's own actor (handles may name a spare)
        self.stand_ins = {}
        self.table = None  # a reconfigure may go back in versions (a fresh controller)
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
        if self.table is not None and placement.version < self.table.version:
            return  # an old publication arriving late
        if spec is not None:
            self.gates = Gates(spec, weights, old=self.gates)
            self.spec = spec
            self.routing_version = placement.version if routing_version is None else routing_version
            self.attempts.faults = spec.faults
        self.traffic.resize(self.spec.num_experts, placement.num_shards)
        self.table = DispatchTable(placement)

    async def set_stand_ins(self, spares: dict) -> None:
        """Send the sub-batches of shard ``n`` to spare ``j`` (``spares``: {n: (j, actor)})
        while its process restarts; every other shard's go to its own actor again."""
        handles = self.shards.handles
        new = {n: j for n, (j, _) in spares.items() if n < len(handles)}
        for n in set(new) | set(self.stand_ins):
            if new.get(n) == self.stand_ins.get(n):
                continue
            handles[n] = spares[n][1] if n in new else self._own[n]
            await self.shards.forget(n)
            if n in new:  # the spare answers for it now, calls waiting on the dead one too
                self.attempts.redirected(n)
        self.stand_ins = new

    def gate_weights(self) -> dict[str, np.ndarray] | None:
        """The gate and shared-expert weights (what a restarted controller re-publishes, a
        checkpoint saves and a grown gate starts from); None until this router is
        configured: a restarted one holds the seeded gate, not the pool's."""
        return self.gates.state_dict() if self.ready() else None

    def ready(self) -> bool:
        """Whether this router can serve (it has shards and a placement)."""
        return self._ready.is_set()

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
        """Pairs routed to each expert since the last call ([E] int64)."""
        return self.traffic.take_load()

    # --- data plane ---------------------------------------------------------------------

    async def forward(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        token_ids: np.ndarray | None = None,
        timeout_s: float | None = None,
        layer: int = 0,
        info: bool = False,
    ):
        """``x`` [..., d] -> [..., d] through MoE layer ``layer``; optional client routes
        [T, S] (the layer's expert ids) or token ids [T]. With ``info``: (output,
        {"degraded_tokens": rows served without some of their experts})."""
        try:
            out, degraded = await self._forward(x, expert_ids, weights, token_ids, timeout_s, layer)
            return (out, {"degraded_tokens": degraded}) if info else out
        except Exception as e:
            self.metrics.inc("raymoe_request_errors_total", error=type(e).__name__)
            raise

    async def _forward(self, x, expert_ids, weights, token_ids, timeout_s, layer) -> np.ndarray:
        limits = self.spec.limits
        timeout = min(timeout_s or limits.request_timeout_s, limits.request_timeout_s)
        deadline = time.monotonic() + timeout
        req = self._check(x, expert_ids, weights, token_ids, deadline, layer)
        if req.tokens == 0:
            return np.zeros(req.x.shape, dtype=np.asarray(x).dtype), 0
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise PoolUnavailableError("the router has no shards configured yet") from None
        try:
            self.batcher.submit(req)
        except Exception:
            self.traffic.counters["rejected"] += 1
            raise
        self.metrics.set("raymoe_queue_depth", len(self.batcher.queue), router=str(self.index))
        try:
            out = await asyncio.wait_for(asyncio.shield(req.future), deadline - time.monotonic())
        except TimeoutError:
            self.traffic.counters["deadline_exceeded"] += 1
            raise DeadlineExceededError(f"request not served within {timeout:.3g} s") from None
        latency = time.perf_counter() - req.started
        self.traffic.request(req.tokens, latency)
        self.metrics.inc("raymoe_requests_total")
        self.metrics.inc("raymoe_tokens_total", req.tokens)
        self.metrics.observe("raymoe_request_latency_seconds", latency)
        if req.degraded:
            self.traffic.counters["degraded_requests"] += 1
            self.metrics.inc("raymoe_degraded_requests_total")
        return out, req.degraded

    def _check(self, x, expert_ids, weights, token_ids, deadline, layer) -> Request:
        fut = asyncio.get_running_loop().create_future()
        return checked(
            self.spec, self.gates, x, expert_ids, weights, token_ids, deadline, fut, layer
        )

    async def _run_batch(self, batch: list[Request]) -> None:
        table, gates = self.table, self.gates  # the one version this batch runs under
        self._running[table.version] += 1  # make before break: old places stay until done
        try:
            await self._run_batch_under(batch, table, gates)
        finally:
            self._running[table.version] -= 1

    async def _run_batch_under(self, batch: list[Request], table: DispatchTable, gates) -> None:
        batch = [r for r in batch if not r.future.done() and still_valid(r, gates)]
        if not batch:
            return
        try:
            t0 = time.perf_counter()
            flat, ids, w, mixes = await self._offload(route_batch, batch, gates)  # 1. route
            t1 = time.perf_counter()
            deadline = max(r.deadline for r in batch)
            done = await self.attempts.run(  # 2. dispatch
                lambda sub, delay: self._call(sub, flat, delay),
                self.shards.retryable,
                ids,
                w,
                table,
                deadline,
            )
            parts, (scale, degraded) = done.parts, renormalise(w, done.dropped)
            if scale is not None and not self.attempts.faults.renormalise:
                scale = None  # the remaining experts keep their weights
            t2 = time.perf_counter()
            spans = spans_of(batch, mixes)
            y = await self._offload(self._combine, flat, parts, gates, spans, scale)  # 3. combine
            stages = {"route": t1 - t0, "dispatch": t2 - t1, "combine": time.perf_counter() - t2}
            self._stage_s.update(stages)
        except BaseException as e:  # every caller of the batch hears about it
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e if isinstance(e, Exception) else RuntimeError(e))
            if not isinstance(e, Exception):
                raise
            return
        shard_pairs = np.zeros(table.num_shards, np.int64)
        for sub, _ in parts:
            shard_pairs[sub.shard] += int((sub.local_ids >= 0).sum())
        tokens = sum(r.tokens for r in batch)
        self.traffic.batch(ids[ids >= 0].numpy(), shard_pairs, tokens)
        self._record_batch(stages, shard_pairs, tokens)
        if degraded is not None:
            self.traffic.counters["degraded_rows"] += int(degraded.sum())
        start = 0
        for r, mix in zip(batch, mixes, strict=True):
            rows = r.tokens if mix is None else mix.x.shape[0]
            out = y[start : start + rows]
            if degraded is not None:
                r.degraded = int(degraded[start : start + rows].sum())
            start += rows
            if mix is not None:
                out = gates.layers[r.layer].router.unmix(out, mix)
            if not r.future.done():
                r.future.set_result(out.reshape(r.x.shape).numpy())

    def _record_direct(self, traffic: dict) -> None:
        """A caller's direct requests in this router's metrics, as if it had served them."""
        m = self.metrics
        for tokens, seconds in traffic["latency_s"]:
            m.inc("raymoe_requests_total")
            m.inc("raymoe_tokens_total", tokens)
            m.observe("raymoe_request_latency_seconds", seconds)
        for n in np.flatnonzero(traffic["shard_pairs"]).tolist():
            m.inc("raymoe_shard_pairs_total", int(traffic["shard_pairs"][n]), shard=str(n))

    def _record_batch(self, stages: dict, shard_pairs: np.ndarray, tokens: int) -> None:
        m = self.metrics
        for stage, seconds in stages.items():
            m.observe("raymoe_stage_seconds", seconds, stage=stage)
        m.observe("raymoe_batch_tokens", tokens)
        for n in np.flatnonzero(shard_pairs).tolist():
            m.inc("raymoe_shard_pairs_total", int(shard_pairs[n]), shard=str(n))
        m.set("raymoe_queue_depth", len(self.batcher.queue), router=str(self.index))

    async def _offload(self, fn, batch_or_flat, *args):
        """Run ``fn`` in a worker thread for big batches (the loop keeps taking requests
        meanwhile); inline for small ones, where the thread hand-off would cost more."""
        first = batch_or_flat
        tokens = first.shape[0] if isinstance(first, torch.Tensor) else sum(r.tokens for r in first)
        if tokens < INLINE_TOKENS:
            return fn(batch_or_flat, *args)
        return await asyncio.to_thread(fn, batch_or_flat, *args)

    async def _call(self, sub: SubBatch, flat: torch.Tensor, delay: float = 0.0) -> np.ndarray:
        if delay > 0:
            await asyncio.sleep(delay)
        return await self.shards.compute(
            sub.shard,
            flat[sub.tokens].numpy(),
            sub.local_ids.numpy(),
            sub.weights.to(torch.float32).numpy(),
            digest_of(sub),
        )

    def _combine(self, flat, parts, gates: Gates, spans: dict, scale=None) -> torch.Tensor:
        return combine_rows(self.spec.d_model, flat, parts, gates, spans, scale)

    # --- introspection ------------------------------------------------------------------

    def published(self, gates_of: int | None = None, traffic: dict | None = None) -> dict | None:
        """What a caller needs to call the shards itself (training, and small requests
        sent straight to the shards): the spec, the dispatch table of the placement version
        in service and the shard actors (spares standing in included), all of one version,
        and the gates unless the caller holds those of this ``routing_version`` already
        (``gates_of``); None until configured. ``traffic``: what the caller's own requests
        routed since its last call (:meth:`RouterStats.served_directly`), counted here."""
        if traffic:
            self.traffic.served_directly(**traffic)
            self._record_direct(traffic)
        if not self.ready():
            return None
        return {
            "spec": self.spec,
            "table": self.table,
            "handles": list(self.shards.handles),
            "routing_version": self.routing_version,
            "gates": None if gates_of == self.routing_version else self.gates,
        }

    def describe(self) -> dict:
        t = self.table
        return {
            "ready": self.ready(),
            "placement_version": t.version if t else None,
            "routing_version": self.routing_version,
            "stand_ins": dict(self.stand_ins),
        }

    def stats(self, window_s: float = 60.0) -> dict:
        """This router's traffic over the last ``window_s`` seconds (merged by the
        controller), with the seconds spent per stage and the queue's length."""
        out = self.traffic.window(window_s)
        out["stage_s"] = dict(self._stage_s)
        out["queued"] = len(self.batcher.queue)
        return out
