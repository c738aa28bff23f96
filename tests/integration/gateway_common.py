"""What the gateway integration tests share: a pool spec with its gateway on a free loopback
port, the tokens, the reference answer, and raw gRPC channels."""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc
import numpy as np
import torch

from raymoe import PoolSpec
from raymoe._private.data import wire
from raymoe.v1 import pool_pb2, tensor_pb2
from tests.helpers import spec_dict

D, E, MAX_TOKENS = 16, 8, 256
DATA, ADMIN = secrets.token_urlsafe(16), secrets.token_urlsafe(16)


def gateway_section(tokens: Path, **gateway) -> dict:
    """A spec's gateway section: on a free loopback port, with the session's token files."""
    return {
        "enabled": True,
        "host": "127.0.0.1",
        "port": 0,
        "data_token_file": str(tokens / "data"),
        "admin_token_file": str(tokens / "admin"),
        **gateway,
    }


def gateway_spec(name: str, tokens: Path, **gateway) -> PoolSpec:
    s = spec_dict({"kind": "topk", "k": 2}, E=E, d=D)
    s.update(
        name=name,
        shards={"count": 2},
        limits={"max_request_tokens": MAX_TOKENS, "max_batch_tokens": MAX_TOKENS},
        gateway=gateway_section(tokens, **gateway),
    )
    return PoolSpec.from_dict(s)


def want(layer, x, **routes):
    with torch.no_grad():
        return layer(torch.as_tensor(x), **{k: torch.as_tensor(v) for k, v in routes.items()})


_CHANNELS: dict = {}


def channel(endpoint):
    if endpoint not in _CHANNELS:
        _CHANNELS[endpoint] = grpc.insecure_channel(endpoint)
    return _CHANNELS[endpoint]


def bearer(token):
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def msg(a) -> tensor_pb2.Tensor:
    """``a`` as a ``Tensor`` message."""
    return wire.to_tensor(np.asarray(a))


def fwd(**fields) -> pool_pb2.ForwardRequest:
    """A ``ForwardRequest`` of ``fields``."""
    return pool_pb2.ForwardRequest(**fields)
