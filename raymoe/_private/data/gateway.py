"""Gateway: the pool's public gRPC server (``grpc.aio``), a plain class over a
:class:`PoolBackend` (``gateway_actor.RayPoolBackend`` in a pool; ``ray.remote`` is applied in
actors.py). Replies are the typed values of :mod:`raymoe.reports`, converted in ``wire``.

- ``raymoe.v1.PoolService`` (data plane) and ``raymoe.v1.AdminService`` (admin plane), from
  ``protos/raymoe/v1``; standard health checking (``grpc.health.v1.Health``) and server
  reflection, both open so that probes and ``grpcurl list`` work without a token.
- Auth: ``authorization: Bearer <token>`` metadata, compared in constant time; the data plane
  takes the data or the admin token, the admin plane only the admin token. Tokens are never
  logged nor echoed.
- Bounds: message sizes from the spec's limits, each tensor's declared size checked before
  anything is allocated, at most ``gateway.max_inflight`` forward calls at once (more get
  ``RESOURCE_EXHAUSTED`` at once, never a queue), ``gateway.stream_window`` requests of one
  stream at once. A call's deadline goes on to the router, which stops waiting at it.
- Errors: a raymoe error becomes its status code with the class name in the ``raymoe-error``
  trailing metadata (``wire.status_of``); anything else is ``INTERNAL`` with no detail. The
  server's plumbing (this, call counting, refusing malformed messages, TLS) is
  :mod:`.serving`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from raymoe._private import timeouts
from raymoe._private.data import wire
from raymoe._private.data.auth import Tokens, _AuthInterceptor
from raymoe._private.data.serving import (
    MALFORMED,
    CallCounter,
    add_service,
    answer,
    fail,
    server_credentials,
    status,
)
from raymoe._private.data.stats import check_load_bins
from raymoe._private.metrics import Metrics, NullMetrics
from raymoe.config import GatewaySpec, PoolSpec
from raymoe.errors import InvalidInputError, PoolOverloadedError
from raymoe.reports import OpReport, PoolDescription, PoolStats
from raymoe.v1 import admin_pb2, admin_pb2_grpc, pool_pb2, pool_pb2_grpc

log = logging.getLogger(__name__)

POOL_SERVICE_DESC = pool_pb2.DESCRIPTOR.services_by_name["PoolService"]
ADMIN_SERVICE_DESC = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
POOL_SERVICE, ADMIN_SERVICE = POOL_SERVICE_DESC.full_name, ADMIN_SERVICE_DESC.full_name
MAX_STATS_WINDOW_S = 24 * 3600.0


class PoolBackend(Protocol):
    """What the gateway needs from a pool (its routers and controller)."""

    async def forward(
        self, x, expert_ids, weights, token_ids, timeout_s, layer: int = 0
    ) -> tuple[np.ndarray, int]:
        """-> (output, rows served without some of their experts: degrade mode)"""
        ...

    async def stats(self, window_s: float, load_bins: int = 0) -> PoolStats: ...
    async def describe(self) -> PoolDescription: ...
    async def op(self, name: str, *args, **kwargs) -> OpReport: ...
    async def save_checkpoint(self, path: str) -> dict: ...
    async def ready(self) -> bool: ...


# --- services ------------------------------------------------------------------------------


class _PoolServicer(pool_pb2_grpc.PoolServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    async def Forward(self, request, context):
        return await answer(context, self.gw.forward(request, context.time_remaining()))

    async def ForwardStream(self, request_iterator, context) -> AsyncIterator:
        # NOTE: a reader task feeds a bounded queue of in-flight requests while this generator
        # answers them in order, so a client that waits for each reply never deadlocks.
        window: asyncio.Queue = asyncio.Queue(maxsize=self.gw.config.stream_window)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    work = self.gw.forward(req, context.time_remaining())
                    await window.put((req.request_id, asyncio.ensure_future(work)))
            finally:
                await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await window.get()) is not None:
                rid, task = item
                try:
                    yield await task
                except Exception as e:
                    code, name, message = status(e)
                    err = pool_pb2.Error(code=code.value[0], type=name, message=message)
                    yield pool_pb2.ForwardReply(request_id=rid, error=err)
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not window.empty():
                if (item := window.get_nowait()) is not None:
                    item[1].cancel()

    async def Stats(self, request, context):
        stats = self.gw.stats(request.window_s, request.load_bins)
        return wire.stats_to_proto(await answer(context, stats))


class _AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    async def _op(self, context, name: str, *args, **kwargs) -> admin_pb2.OperationReport:
        work = self.gw.backend.op(name, *args, **kwargs)
        return wire.report_to_proto(await answer(context, work))

    async def Describe(self, request, context):
        return wire.describe_to_proto(await answer(context, self.gw.backend.describe()))

    async def Rebalance(self, request, context):
        return await self._op(context, "rebalance", request.dry_run, request.policy or None)

    async def Replicate(self, request, context):
        args = (request.expert_id, request.replicas)
        return await self._op(context, "replicate", *args, layer=request.layer)

    async def Pin(self, request, context):
        args = (request.expert_id, request.replicas)
        return await self._op(context, "pin", *args, layer=request.layer)

    async def Unpin(self, request, context):
        return await self._op(context, "unpin", request.expert_id, layer=request.layer)

    async def DrainShard(self, request, context):
        return await self._op(context, "drain_shard", request.shard)

    async def ScaleShards(self, request, context):
        return await self._op(context, "scale_shards", request.count)

    async def AddExperts(self, request, context):
        weights = await answer(context, self.gw.decode_weights(request.weights))
        args = (request.count, weights)
        return await self._op(context, "add_experts", *args, layer=request.layer)

    async def Checkpoint(self, request, context):
        if not request.path.startswith("/"):
            await answer(context, fail(InvalidInputError("path: an absolute path, please")))
        manifest = await answer(context, self.gw.backend.save_checkpoint(request.path))
        return admin_pb2.CheckpointReply(
            placement_version=manifest["placement_version"], manifest_json=json.dumps(manifest)
        )

    async def RemoveExperts(self, request, context):
        ids = np.asarray(request.expert_ids, np.int64)
        return await self._op(context, "remove_experts", ids, layer=request.layer)


# --- the server ----------------------------------------------------------------------------


class Gateway:
    """One gRPC server in front of a pool. Start it in a running event loop."""

    def __init__(
        self,
        spec: PoolSpec,
        backend: PoolBackend,
        tokens: Tokens | None = None,
        config: GatewaySpec | None = None,
        metrics: Metrics | None = None,
    ):
        self.spec = spec
        self.metrics = metrics or NullMetrics()
        self.config = config or spec.gateway
        self.backend = backend
        self.tokens = tokens if tokens is not None else Tokens.load(self.config)
        self.max_bytes = wire.max_message_bytes(spec)
        self._inflight = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._watch: asyncio.Task | None = None
        self.endpoint: str | None = None

    async def forward(self, req: pool_pb2.ForwardRequest, time_left: float | None):
        """One request of the data plane: decode, bound, hand to the pool; -> ForwardReply."""
        if self._inflight >= self.config.max_inflight:
            raise PoolOverloadedError(
                f"the gateway has {self._inflight} requests in flight "
                f"(gateway.max_inflight); retry later"
            )
        if req is MALFORMED:
            raise InvalidInputError("malformed request message")
        if not req.HasField("x"):
            raise InvalidInputError("x: required")
        self._inflight += 1
        try:
            x = wire.from_tensor(req.x, "x", max_bytes=self.max_bytes)
            opt = {f: self._optional(req, f) for f in ("expert_ids", "weights", "token_ids")}
            if time_left is not None and time_left <= 0:
                raise TimeoutError
            work = self.backend.forward(
                x, opt["expert_ids"], opt["weights"], opt["token_ids"], time_left, req.layer
            )
            y, degraded = await asyncio.wait_for(work, time_left)
            return pool_pb2.ForwardReply(
                request_id=req.request_id, y=wire.to_tensor(y), degraded_tokens=degraded
            )
        finally:
            self._inflight -= 1

    def _optional(self, req, field: str) -> np.ndarray | None:
        if not req.HasField(field):
            return None
        return wire.from_tensor(getattr(req, field), field, max_bytes=self.max_bytes)

    async def stats(self, window_s: float, load_bins: int = 0) -> PoolStats:
        window = window_s or 60.0
        if not 0 < window <= MAX_STATS_WINDOW_S:  # NaN fails too
            raise InvalidInputError(
                f"window_s must be in (0, {MAX_STATS_WINDOW_S:g}], got {window_s}"
            )
        if load_bins:
            check_load_bins(load_bins)
        return await self.backend.stats(window, load_bins)

    async def decode_weights(self, weights) -> dict[str, np.ndarray]:
        return {k: wire.from_tensor(t, k, max_bytes=self.max_bytes) for k, t in weights.items()}

    async def start(self) -> str:
        """Bind and serve; -> "host:port" (the port is a free one when the config says 0)."""
        c = self.config
        # NOTE: no SO_REUSEPORT (gRPC's default on Linux): a second gateway on a taken port
        # would silently share it with another pool; here it fails to bind instead
        options = [
            ("grpc.max_receive_message_length", self.max_bytes),
            ("grpc.max_send_message_length", self.max_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            interceptors=[CallCounter(self.metrics), _AuthInterceptor(self.tokens)],
            options=options,
            maximum_concurrent_rpcs=4 * c.max_inflight,
        )
        add_service(server, _PoolServicer(self), POOL_SERVICE_DESC)
        add_service(server, _AdminServicer(self), ADMIN_SERVICE_DESC)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (POOL_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{c.host}:{c.port}"
        if c.tls_cert_file:
            port = server.add_secure_port(address, server_credentials(c))
        else:
            port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        host = "127.0.0.1" if c.host in ("0.0.0.0", "::", "") else c.host
        self.endpoint = f"{host}:{port}"
        self._watch = asyncio.ensure_future(self._watch_health())
        log.info(
            "raymoe gateway for pool %r on %s (tls: %s, %r)",
            self.spec.name,
            address,
            bool(c.tls_cert_file),
            self.tokens,
        )
        return self.endpoint

    async def _check_health(self, timeout_s: float) -> bool:
        """Ask the pool whether it serves; publish SERVING or NOT_SERVING."""
        try:
            ok = await asyncio.wait_for(self.backend.ready(), timeout_s)
        except Exception:
            ok = False
        S = health_pb2.HealthCheckResponse
        for service in ("", POOL_SERVICE, ADMIN_SERVICE):
            await self._health.set(service, S.SERVING if ok else S.NOT_SERVING)
        return ok

    async def _watch_health(self) -> None:
        ok = await self._check_health(timeouts.HEALTH_FIRST_S)  # it attaches to the pool
        while True:
            await asyncio.sleep(timeouts.HEALTH_INTERVAL_S if ok else timeouts.HEALTH_RETRY_S)
            ok = await self._check_health(timeouts.HEALTH_INTERVAL_S)

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace_s)


class GatewayThread:
    """A :class:`Gateway` on its own event loop thread: what the gateway actor runs, and a
    context manager that starts one for a test and always stops it."""

    def __init__(self, gateway: Gateway, start_timeout_s: float = 30.0):
        self.gateway = gateway
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="raymoe-gateway"
        )
        self._thread.start()
        done = asyncio.run_coroutine_threadsafe(gateway.start(), self._loop)
        try:
            self.endpoint = done.result(start_timeout_s)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def stop(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> GatewayThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
