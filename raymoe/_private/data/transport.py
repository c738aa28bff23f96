"""Router -> shard transports (the design's "object store or gRPC"), chosen by
``spec.shards.transport``.

- ``object_store``: a Ray actor call per sub-batch; numpy arrays travel through the object
  store (zero-copy for large ones). It is a Ray call, so it lives in ``actors.py``.
- ``grpc`` (here): every shard serves a small internal gRPC endpoint
  (``ExpertShardService``, raw tensor bytes, no pickle); routers look a shard's endpoint up
  (through Ray, by a function they are given), keep one channel per shard, and look it up
  again when a shard restarts on a new port. The endpoint is internal to the cluster network
  and unauthenticated; the public, authenticated surface is the gateway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from concurrent import futures

import grpc

from raymoe._private.data.wire import encode_message, from_tensor, max_message_bytes, to_tensor
from raymoe.config import PoolSpec
from raymoe.errors import InvalidInputError, ShardNotReadyError
from raymoe.v1 import shard_pb2, shard_pb2_grpc

TRANSPORTS = ("object_store", "grpc")
SERVICE = "raymoe.v1.ExpertShardService"
COMPUTE = f"/{SERVICE}/Compute"


class ShardUnreachableError(Exception):
    """A shard's gRPC endpoint did not answer (dead, restarting, or moved to a new port), or
    ``refused`` the call before doing any of it (reloading, or its places changed)."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class GrpcShardCalls:
    """:class:`raymoe._private.data.router.ShardCalls` over each shard's gRPC endpoint.

    ``endpoint(handle)`` looks up the "host:port" of the actor ``handles[n]``;
    ``also_retryable`` says which other errors (those of the lookup itself) mean "down or
    reloading"."""

    RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)

    def __init__(
        self,
        spec: PoolSpec,
        handles: list,
        endpoint: Callable[[object], Awaitable[str]],
        also_retryable: Callable[[BaseException], bool],
    ):
        self.handles = handles
        self.max_bytes = max_message_bytes(spec)
        self._endpoint = endpoint
        self._also = also_retryable
        self._stubs: dict[int, tuple[grpc.aio.Channel, _Stub]] = {}

    async def _stub(self, shard: int):
        if shard not in self._stubs:
            endpoint = await self._endpoint(self.handles[shard])
            channel = grpc.aio.insecure_channel(endpoint, options=_options(self.max_bytes))
            self._stubs[shard] = (channel, _Stub(channel))
        return self._stubs[shard][1]

    async def compute(self, shard, x, local_ids, weights, digest, keep=None):
        req = compute_request(x, local_ids, weights, digest, keep=keep)
        reply = await self._call(shard, "Compute", req)
        return from_tensor(reply.y, "y")

    async def backward(self, shard, x, local_ids, weights, grad_y, digest, keep=None):
        """-> (grad of x, grad of weights), or None: without ``x`` and ``weights`` (None), the
        shard kept no forward ``keep`` and wants them."""
        req = shard_pb2.BackwardRequest(
            local_ids=to_tensor(local_ids),
            grad_y=to_tensor(grad_y),
            places_digest=digest,
            keep=keep,
        )
        if x is not None and weights is not None:
            req.x.CopyFrom(to_tensor(x))
            req.weights.CopyFrom(to_tensor(weights))
        reply = await self._call(shard, "Backward", req)
        if not reply.HasField("grad_x"):
            return None
        return from_tensor(reply.grad_x, "grad_x"), from_tensor(reply.grad_weights, "grad_weights")

    async def _call(self, shard: int, method: str, req):
        stub = await self._stub(shard)
        try:
            return await getattr(stub, method)(req)
        except grpc.aio.AioRpcError as e:
            if e.code() not in self.RETRY_CODES:
                raise
            channel, _ = self._stubs.pop(shard, (None, None))
            if channel is not None and e.code() == grpc.StatusCode.UNAVAILABLE:
                await channel.close()  # NOTE: a restarted shard listens on a new port
            refused = e.code() == grpc.StatusCode.FAILED_PRECONDITION
            message = f"shard {shard}: {e.code().name}: {e.details()}"
            raise ShardUnreachableError(message, refused) from e

    def retryable(self, error: BaseException) -> bool:
        return isinstance(error, ShardUnreachableError) or self._also(error)

    def refused(self, error: BaseException) -> bool:
        return isinstance(error, ShardUnreachableError) and error.refused

    async def forget(self, shard: int) -> None:
        """Look shard ``shard``'s endpoint up again on its next call (another actor serves
        it now: a spare standing in, or the shard back)."""
        channel, _ = self._stubs.pop(shard, (None, None))
        if channel is not None:
            await channel.close()


class BlockingGrpcShards:
    """Compute calls from the caller's own thread (small requests sent straight to the
    shards, :mod:`raymoe._private.direct`) over each shard's gRPC endpoint, with a channel
    per shard actor kept across placement versions; ``endpoint(handle)`` looks its
    "host:port" up (blocking)."""

    def __init__(self, spec: PoolSpec, endpoint: Callable[[object], str]):
        self.max_bytes = max_message_bytes(spec)
        self._endpoint = endpoint
        self._stubs: dict = {}  # actor id -> (channel, stub)

    def start(self, handle, x, local_ids, weights, digest: int, routing: int):
        """Send one sub-batch, gated under routing version ``routing`` -> the pending call
        (for :meth:`results`)."""
        key = handle._actor_id
        if key not in self._stubs:
            channel = grpc.insecure_channel(
                self._endpoint(handle), options=_options(self.max_bytes)
            )
            self._stubs[key] = (channel, _Stub(channel))
        req = compute_request(x, local_ids, weights, digest, routing=routing)
        return key, self._stubs[key][1].Compute.future(req)

    def results(self, calls: list, timeout_s: float) -> list:
        """The calls' outputs, in order; the first failure (or ``timeout_s`` passing) raises,
        and cancels the rest. A shard that did not answer is looked up again next time (it
        may be back on another port)."""
        end = time.monotonic() + timeout_s
        try:
            return [
                from_tensor(c.result(max(end - time.monotonic(), 0.0)).y, "y") for _, c in calls
            ]
        except BaseException as e:
            for key, c in calls:
                answered = c.done()
                c.cancel()
                if not answered or c.code() == grpc.StatusCode.UNAVAILABLE:
                    self._drop(key)
            if isinstance(e, grpc.FutureTimeoutError):
                raise TimeoutError(f"a shard did not answer within {timeout_s:.3g} s") from None
            raise

    @staticmethod
    def refused(error: BaseException) -> bool:
        """Whether ``error`` is a shard's refusal, before doing any of the call."""
        return (
            isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.FAILED_PRECONDITION
        )

    def keep_only(self, handles: list) -> None:
        """Close the channels of shard actors no longer in ``handles``."""
        now = {h._actor_id for h in handles}
        for key in [k for k in self._stubs if k not in now]:
            self._drop(key)

    def close(self) -> None:
        self.keep_only([])

    def _drop(self, key) -> None:
        channel, _ = self._stubs.pop(key, (None, None))
        if channel is not None:
            channel.close()


def compute_request(x, local_ids, weights, digest: int, keep=None, routing=None) -> bytes:
    """A shard's ``Compute`` message, serialized (``keep``, ``routing``: unset when None)."""
    m = shard_pb2.ComputeRequest
    return encode_message(
        {m.X_FIELD_NUMBER: x, m.LOCAL_IDS_FIELD_NUMBER: local_ids, m.WEIGHTS_FIELD_NUMBER: weights},
        {
            m.PLACES_DIGEST_FIELD_NUMBER: digest,
            m.KEEP_FIELD_NUMBER: keep,
            m.ROUTING_VERSION_FIELD_NUMBER: routing,
        },
    )


def _serialized(message) -> bytes:
    """A message as bytes (one already serialized as it is)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Stub(shard_pb2_grpc.ExpertShardServiceStub):
    """The generated stub, with ``Compute`` sending a request serialized already
    (:func:`compute_request`)."""

    def __init__(self, channel):
        super().__init__(channel)
        self.Compute = channel.unary_unary(
            COMPUTE,
            request_serializer=_serialized,
            response_deserializer=shard_pb2.ComputeReply.FromString,
        )


class _Servicer(shard_pb2_grpc.ExpertShardServiceServicer):
    def __init__(self, shard, lock: threading.Lock, max_bytes: int):
        self.shard, self.lock, self.max_bytes = shard, lock, max_bytes

    def Compute(self, request, context):
        def run():
            x, ids, w = self._inputs(request)
            routing = request.routing_version if request.HasField("routing_version") else None
            y = self.shard.compute(x, ids, w, self._digest(request), self._keep(request), routing)
            return encode_message({shard_pb2.ComputeReply.Y_FIELD_NUMBER: y}, {})

        return self._serve(run, context)

    def Backward(self, request, context):
        def run():
            x, ids, w = self._inputs(request, optional=("x", "weights"))
            gy = from_tensor(request.grad_y, "grad_y", max_bytes=self.max_bytes)
            got = self.shard.backward(x, ids, w, gy, self._digest(request), self._keep(request))
            if got is None:  # no kept forward, and no inputs to recompute it: send them
                return shard_pb2.BackwardReply()
            gx, gw = got
            return shard_pb2.BackwardReply(grad_x=to_tensor(gx), grad_weights=to_tensor(gw))

        return self._serve(run, context)

    def _inputs(self, request, optional: tuple[str, ...] = ()):
        return tuple(
            None
            if f in optional and not request.HasField(f)
            else from_tensor(getattr(request, f), f, max_bytes=self.max_bytes)
            for f in ("x", "local_ids", "weights")
        )

    @staticmethod
    def _digest(request):
        return request.places_digest if request.HasField("places_digest") else None

    @staticmethod
    def _keep(request):
        return request.keep if request.HasField("keep") else None

    def _serve(self, run, context):
        try:
            with self.lock:
                return run()
        except ShardNotReadyError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (InvalidInputError, ValueError, IndexError, RuntimeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")


def serve_shard(shard, lock: threading.Lock, spec: PoolSpec, host: str) -> tuple[grpc.Server, str]:
    """Start ``shard``'s gRPC endpoint on a free port of ``host``; -> (server, "host:port")."""
    max_bytes = max_message_bytes(spec)
    # NOTE: one worker thread: a shard computes one sub-batch at a time (its kernels already
    # use the actor's threads); the bounded queue makes gRPC answer RESOURCE_EXHAUSTED.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1),
        options=_options(max_bytes),
        maximum_concurrent_rpcs=spec.limits.max_queued_requests,
    )
    servicer = _Servicer(shard, lock, max_bytes)
    handlers = {  # the generated ones, but for Compute's reply: serialized already
        "Compute": grpc.unary_unary_rpc_method_handler(
            servicer.Compute,
            request_deserializer=shard_pb2.ComputeRequest.FromString,
            response_serializer=_serialized,
        ),
        "Backward": grpc.unary_unary_rpc_method_handler(
            servicer.Backward,
            request_deserializer=shard_pb2.BackwardRequest.FromString,
            response_serializer=shard_pb2.BackwardReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, f"{host}:{port}"


def _options(max_bytes: int) -> list:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]
