"""The gateway's gRPC server plumbing: how a failed call becomes a status, the count of calls
by method and code, refusing a request that does not parse (INVALID_ARGUMENT, where gRPC
itself would answer INTERNAL), and the server's TLS credentials."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from raymoe._private.data import wire
from raymoe._private.metrics import Metrics
from raymoe.config import GatewaySpec
from raymoe.errors import InvalidInputError, RaymoeError

log = logging.getLogger(__name__)


def status(error: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status code, raymoe error class, message) of a failed call."""
    if isinstance(error, RaymoeError):
        return *wire.status_of(error), str(error)
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "DeadlineExceededError", "deadline passed"
    log.error("gateway: unexpected %s", type(error).__name__, exc_info=error)
    return (
        grpc.StatusCode.INTERNAL,
        "RaymoeError",
        (f"internal error ({type(error).__name__}); see the gateway's log"),
    )


async def answer(context, work: Awaitable[Any]):
    """Await ``work``; a failure becomes a clean status (and the call ends)."""
    try:
        return await work
    except Exception as e:
        code, name, message = status(e)
    context.set_trailing_metadata(((wire.ERROR_TYPE_KEY, name),))
    await context.abort(code, message)


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts every call by method and final status code (refused ones included: it runs
    before the token check)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = details.method.rsplit("/", 1)[-1]
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            fn = handler.unary_unary

            async def unary(request, context):
                with self._counting(method, context):
                    return await fn(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.unary_stream is not None or handler.stream_stream is not None:
            fn = handler.unary_stream or handler.stream_stream

            async def stream(request, context):
                with self._counting(method, context):
                    out = fn(request, context)
                    if inspect.isawaitable(out):  # a handler that writes with context.write
                        await out
                    else:
                        async for reply in out:
                            yield reply

            make = grpc.unary_stream_rpc_method_handler
            if handler.stream_stream is not None:
                make = grpc.stream_stream_rpc_method_handler
            return make(stream, **kw)
        return handler

    @contextlib.contextmanager
    def _counting(self, method: str, context):
        code = None
        try:
            yield
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            code = code or context.code() or grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            self.metrics.inc("raymoe_gateway_calls_total", method=method, code=name)


class _Malformed:
    """What a request that is not a valid protobuf message decodes to."""


MALFORMED = _Malformed()


def add_service(server: grpc.aio.Server, servicer, service) -> None:
    """Like the generated ``add_*Servicer_to_server``, except that a request that does not
    parse reaches the servicer as :data:`MALFORMED` and gets INVALID_ARGUMENT (gRPC itself
    would answer INTERNAL)."""
    handlers = {}
    for m in service.methods:
        request_cls = message_factory.GetMessageClass(m.input_type)
        reply_cls = message_factory.GetMessageClass(m.output_type)
        fn = getattr(servicer, m.name)
        kw = {
            "request_deserializer": _tolerant(request_cls.FromString),
            "response_serializer": reply_cls.SerializeToString,
        }
        if m.client_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(fn, **kw)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(_refuse_malformed(fn), **kw)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _tolerant(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError:
            return MALFORMED

    return deserialize


def _refuse_malformed(fn):
    async def handler(request, context):
        if request is MALFORMED:
            return await answer(context, fail(InvalidInputError("malformed request message")))
        return await fn(request, context)

    return handler


async def fail(error: Exception):
    raise error


def server_credentials(c: GatewaySpec) -> grpc.ServerCredentials:
    key, cert = Path(c.tls_key_file).read_bytes(), Path(c.tls_cert_file).read_bytes()
    ca = Path(c.tls_client_ca_file).read_bytes() if c.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
