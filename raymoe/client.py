"""The Python SDK: :class:`Client` and :class:`AsyncClient` reach a pool's gRPC gateway from
outside the Ray cluster, with the methods of :class:`raymoe.PoolHandle`.

    with raymoe.Client("pool.example:50051", token=..., tls=raymoe.TLS(ca_file="ca.pem")) as c:
        y = c.forward(x)              # torch in, torch out (numpy in, numpy out)
        c.rebalance(dry_run=True)     # admin calls need the admin token

Failures are raymoe errors (mapped from the status code and the gateway's ``raymoe-error``
metadata): :class:`~raymoe.InvalidInputError` and its subclasses, :class:`~raymoe.
AuthenticationError`, :class:`~raymoe.PermissionDeniedError`, :class:`~raymoe.
PoolOverloadedError`, :class:`~raymoe.DeadlineExceededError`, :class:`~raymoe.
PoolUnavailableError`. Unary calls are retried with exponential backoff while the gateway is
``UNAVAILABLE``, within the call's deadline (every call is idempotent); streams are not.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raymoe._private.data import wire
from raymoe._private.data.stats import check_load_bins
from raymoe.errors import LayerIndexError, RaymoeError
from raymoe.reports import ForwardInfo
from raymoe.v1 import admin_pb2, admin_pb2_grpc, pool_pb2, pool_pb2_grpc

TOKEN_ENV = "RAYMOE_TOKEN"
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True)
class TLS:
    """TLS to the gateway: the CA that signed its certificate (``None``: the system's roots),
    and a client certificate and key for mutual TLS. Paths to PEM files."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # the name the certificate must hold, if not the target's

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p):
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )


class _Base:
    """What both clients share: channel set-up, requests, replies, errors; the methods of
    :class:`raymoe.PoolHandle`, each one ``self._unary(...)`` (sync or async)."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: TLS | bool | None = None,
        *,
        timeout_s: float = 60.0,
        admin_timeout_s: float = 600.0,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.target = target
        self.timeout_s, self.admin_timeout_s, self.retries = timeout_s, admin_timeout_s, retries
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if isinstance(tls, TLS) and tls.server_name:
            self._options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._creds = (TLS() if tls is True else tls).credentials() if tls else None
        self._channel = self._open()
        self._pool = pool_pb2_grpc.PoolServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __repr__(self) -> str:  # NOTE: no token
        return f"{type(self).__name__}({self.target!r})"

    # --- the methods of PoolHandle

    def forward(
        self,
        x,
        *,
        layer=0,
        expert_ids=None,
        weights=None,
        token_ids=None,
        timeout_s=None,
        return_info=False,
    ):
        """``x`` [..., d] (torch or numpy) through MoE layer ``layer`` -> output of the same
        kind and shape; optional client routes ``expert_ids``/``weights`` [T, S] (the
        layer's expert ids) and ``token_ids`` [T]. With ``return_info``: (output,
        :class:`~raymoe.reports.ForwardInfo`)."""
        req = _request(x, expert_ids, weights, token_ids, layer=layer)

        def convert(reply):
            y = _output(reply, x)
            return (y, ForwardInfo(reply.degraded_tokens)) if return_info else y

        return self._unary(self._pool.Forward, req, convert, timeout_s)

    def stats(self, window_s: float = 60.0, load_bins: int = 0):
        """Throughput, latency p50/p99, per-shard pairs, imbalance, per-expert load; with
        ``load_bins``, the load map (shard x bins of experts)."""
        if load_bins:
            check_load_bins(load_bins)
        req = pool_pb2.StatsRequest(window_s=window_s, load_bins=load_bins)
        return self._unary(self._pool.Stats, req, wire.stats_from_proto, None)

    def describe(self):
        """Spec, shards, routers, placement version, experts per shard (admin plane)."""
        return self._admin_call("Describe", admin_pb2.DescribeRequest(), wire.describe_from_proto)

    def rebalance(self, dry_run: bool = False, policy: str | None = None):
        return self._op("Rebalance", admin_pb2.RebalanceRequest(dry_run=dry_run, policy=policy))

    # Operations on experts take the ``layer`` they belong to (multi-layer pools).

    def replicate(self, expert_id: int, replicas: int, *, layer: int = 0):
        req = admin_pb2.ReplicaRequest(expert_id=expert_id, replicas=replicas, layer=layer)
        return self._op("Replicate", req)

    def pin(self, expert_id: int, replicas: int, *, layer: int = 0):
        req = admin_pb2.ReplicaRequest(expert_id=expert_id, replicas=replicas, layer=layer)
        return self._op("Pin", req)

    def unpin(self, expert_id: int, *, layer: int = 0):
        return self._op("Unpin", admin_pb2.ExpertRequest(expert_id=expert_id, layer=layer))

    def drain_shard(self, shard: int):
        return self._op("DrainShard", admin_pb2.DrainShardRequest(shard=shard))

    def scale_shards(self, count: int):
        return self._op("ScaleShards", admin_pb2.ScaleShardsRequest(count=count))

    def add_experts(self, count: int, weights: dict | None = None, *, layer: int = 0):
        """Add ``count`` experts to ``layer``; the report's ``expert_ids`` are their new ids.
        ``weights`` as for :meth:`raymoe.PoolHandle.add_experts`."""
        w = {k: wire.to_tensor(_np(v)) for k, v in (weights or {}).items()}
        req = admin_pb2.AddExpertsRequest(count=count, weights=w, layer=layer)
        return self._op("AddExperts", req)

    def remove_experts(self, expert_ids, *, layer: int = 0):
        ids = np.asarray(_np(expert_ids), np.int64).reshape(-1).tolist()
        req = admin_pb2.RemoveExpertsRequest(expert_ids=ids, layer=layer)
        return self._op("RemoveExperts", req)

    def save(self, path: str):
        """Write a checkpoint to ``path`` (absolute, on the pool controller's node or shared
        storage), as :meth:`raymoe.PoolHandle.save`. -> the manifest."""
        req = admin_pb2.CheckpointRequest(path=str(path))
        return self._admin_call("Checkpoint", req, lambda r: json.loads(r.manifest_json))

    def health(self):
        """The gateway's health status: "SERVING", "NOT_SERVING", ..."""
        req = health_pb2.HealthCheckRequest(service="")
        return self._unary(self._health.Check, req, _health_name, None)

    def _op(self, method: str, request):
        return self._admin_call(method, request, wire.report_from_proto)

    def _admin_call(self, method: str, request, convert):
        return self._unary(getattr(self._admin, method), request, convert, self.admin_timeout_s)

    # --- plumbing

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)

    def _retry_in(self, error: grpc.RpcError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        wait = min(0.05 * 2**attempt, 2.0) * random.uniform(0.8, 1.2)
        return wait if time.monotonic() + wait < deadline else None


class Client(_Base):
    """A blocking client of a pool's gateway. Thread-safe; use as a context manager or
    :meth:`close` it."""

    def _open(self):
        if self._creds is not None:
            return grpc.secure_channel(self.target, self._creds, options=self._options)
        return grpc.insecure_channel(self.target, options=self._options)

    def _unary(self, method, request, convert, timeout_s):
        deadline = self._deadline(timeout_s)
        for attempt in range(self.retries + 1):
            try:
                reply = method(
                    request, timeout=max(deadline - time.monotonic(), 1e-3), metadata=self._metadata
                )
            except grpc.RpcError as e:
                wait = self._retry_in(e, attempt, deadline)
                if wait is None:
                    raise _error(e) from None
                time.sleep(wait)
            else:
                return convert(reply)
        raise AssertionError("unreachable")

    def forward_stream(self, batches: Iterable, *, timeout_s: float | None = None):
        """Many forward passes over one stream; yields each output in order. A batch is a
        tensor ``x`` or a dict of :meth:`forward`'s arguments. A failed batch raises its
        error when its turn comes; the stream is not retried."""
        kinds: collections.deque = collections.deque()
        requests = (_stream_request(i, b, kinds) for i, b in enumerate(batches))
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        replies = self._pool.ForwardStream(requests, timeout=timeout, metadata=self._metadata)
        try:
            for reply in replies:
                yield _output(reply, kinds.popleft())
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            replies.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: every method of :class:`Client` as a coroutine (and
    :meth:`forward_stream` as an async generator). Create it inside a running event loop."""

    def _open(self):
        if self._creds is not None:
            return grpc.aio.secure_channel(self.target, self._creds, options=self._options)
        return grpc.aio.insecure_channel(self.target, options=self._options)

    async def _unary(self, method, request, convert, timeout_s):
        deadline = self._deadline(timeout_s)
        for attempt in range(self.retries + 1):
            try:
                reply = await method(
                    request, timeout=max(deadline - time.monotonic(), 1e-3), metadata=self._metadata
                )
            except grpc.RpcError as e:
                wait = self._retry_in(e, attempt, deadline)
                if wait is None:
                    raise _error(e) from None
                await asyncio.sleep(wait)
            else:
                return convert(reply)
        raise AssertionError("unreachable")

    async def forward_stream(
        self, batches: Iterable | AsyncIterable, *, timeout_s: float | None = None
    ):
        kinds: collections.deque = collections.deque()

        async def requests():
            if isinstance(batches, AsyncIterable):
                i = 0
                async for b in batches:
                    yield _stream_request(i, b, kinds)
                    i += 1
            else:
                for i, b in enumerate(batches):
                    yield _stream_request(i, b, kinds)

        timeout = timeout_s if timeout_s is not None else self.timeout_s
        call = self._pool.ForwardStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for reply in call:
                yield _output(reply, kinds.popleft())
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# --- conversions ---------------------------------------------------------------------------


def _np(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().contiguous().numpy()
    return np.asarray(a)


def _request(x, expert_ids=None, weights=None, token_ids=None, request_id: int = 0, layer=0):
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < 2**32:
        raise LayerIndexError(f"layer must be a non-negative int, got {layer!r}")
    req = pool_pb2.ForwardRequest(x=wire.to_tensor(_np(x)), request_id=request_id, layer=layer)
    for field, value in (
        ("expert_ids", expert_ids),
        ("weights", weights),
        ("token_ids", token_ids),
    ):
        if value is not None:
            getattr(req, field).CopyFrom(wire.to_tensor(_np(value)))
    return req


def _stream_request(i: int, batch, kinds: collections.deque):
    args: dict[str, Any] = dict(batch) if isinstance(batch, dict) else {"x": batch}
    kinds.append(args["x"])
    return _request(request_id=i, **args)


def _output(reply: pool_pb2.ForwardReply, like):
    if reply.HasField("error"):
        e = reply.error
        raise wire.error_of(_CODES.get(e.code, grpc.StatusCode.UNKNOWN), e.message, e.type)
    y = wire.from_tensor(reply.y, "y").copy()  # the view is read-only; callers may write
    return torch.from_numpy(y) if isinstance(like, torch.Tensor) else y


def _health_name(reply) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _error(e: grpc.RpcError) -> RaymoeError:
    kind = dict(e.trailing_metadata() or ()).get(wire.ERROR_TYPE_KEY)
    return wire.error_of(e.code(), e.details() or "", kind)
