"""The gateway's bearer tokens: one per plane, read from a file or the environment, compared
in constant time, never logged; and the interceptor that checks every call's token before
its handler runs. Health checking and reflection stay open (probes, ``grpcurl list``)."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc

from raymoe._private.data import wire
from raymoe.config import GatewaySpec
from raymoe.errors import AuthenticationError, PermissionDeniedError, RaymoeError
from raymoe.v1 import admin_pb2, pool_pb2

POOL_SERVICE = pool_pb2.DESCRIPTOR.services_by_name["PoolService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


@dataclass(frozen=True, repr=False)
class Tokens:
    """The bearer tokens of the two planes (``None``: data plane open / admin plane closed)."""

    data: bytes | None = None
    admin: bytes | None = None

    def __repr__(self) -> str:  # NOTE: never show a token, not even in a traceback
        return f"Tokens(data={'set' if self.data else None}, admin={'set' if self.admin else None})"

    @classmethod
    def load(cls, g: GatewaySpec) -> Tokens:
        """Read each token from its file, else from its environment variable."""
        return cls(
            _read_token(g.data_token_file, g.data_token_env),
            _read_token(g.admin_token_file, g.admin_token_env),
        )

    def check(self, metadata, plane: str) -> None:
        """Raise :class:`AuthenticationError` / :class:`PermissionDeniedError` unless the
        call's metadata may use ``plane`` ("data" or "admin")."""
        if plane == "data" and self.data is None:
            return
        if plane == "admin" and self.admin is None:
            raise PermissionDeniedError(
                "the admin plane is disabled: the gateway has no admin token configured"
            )
        sent = _bearer(metadata)
        if sent is None:
            raise AuthenticationError("missing bearer token (metadata 'authorization: Bearer ...')")
        is_admin = self.admin is not None and hmac.compare_digest(sent, self.admin)
        is_data = self.data is not None and hmac.compare_digest(sent, self.data)
        if not (is_admin or is_data):
            raise AuthenticationError("invalid bearer token")
        if plane == "admin" and not is_admin:
            raise PermissionDeniedError("this token may not use the admin plane")


def _read_token(path: str | None, env: str) -> bytes | None:
    raw = Path(path).read_bytes() if path else os.environ.get(env, "").encode()
    return raw.strip() or None


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            v = value.encode() if isinstance(value, str) else value
            scheme, _, token = v.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the token of every data-plane and admin-plane call before its handler runs."""

    PLANES: ClassVar = {f"/{POOL_SERVICE}/": "data", f"/{ADMIN_SERVICE}/": "admin"}

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        plane = next((p for pre, p in self.PLANES.items() if details.method.startswith(pre)), None)
        if plane is not None:
            try:
                self.tokens.check(details.invocation_metadata, plane)
            except RaymoeError as e:
                return _refusal(e, details.method.endswith("ForwardStream"))
        return await continuation(details)


def _refusal(error: RaymoeError, streaming: bool) -> grpc.RpcMethodHandler:
    code, name = wire.status_of(error)

    async def refuse(_request, context):
        context.set_trailing_metadata(((wire.ERROR_TYPE_KEY, name),))
        await context.abort(code, str(error))

    if streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
