"""raymoe: an elastic expert-pool service for Mixture-of-Experts models on Ray."""

from raymoe.api import PoolHandle
from raymoe.client import TLS, AsyncClient, Client
from raymoe.config import PoolSpec, load_spec
from raymoe.errors import (
    AuthenticationError,
    CheckpointError,
    ConfigError,
    DeadlineExceededError,
    DTypeError,
    EmptyBatchError,
    ExpertIdError,
    InvalidInputError,
    LayerIndexError,
    LayoutError,
    NonFiniteError,
    PermissionDeniedError,
    PoolError,
    PoolExistsError,
    PoolNotFoundError,
    PoolOverloadedError,
    PoolUnavailableError,
    RaymoeError,
    RequestTooLargeError,
    ResourceLimitError,
    ShapeError,
    StoreUnavailableError,
)
from raymoe.launch import connect, resume, serve
from raymoe.layer import MoEInfo, MoELayer, MoEStack
from raymoe.remote import RemoteMoE
from raymoe.reports import ForwardInfo, Latency, OpReport, PoolDescription, PoolStats

__version__ = "0.1.0"

__all__ = [
    "TLS",
    "AsyncClient",
    "AuthenticationError",
    "CheckpointError",
    "Client",
    "ConfigError",
    "DTypeError",
    "DeadlineExceededError",
    "EmptyBatchError",
    "ExpertIdError",
    "ForwardInfo",
    "InvalidInputError",
    "Latency",
    "LayerIndexError",
    "LayoutError",
    "MoEInfo",
    "MoELayer",
    "MoEStack",
    "NonFiniteError",
    "OpReport",
    "PermissionDeniedError",
    "PoolDescription",
    "PoolError",
    "PoolExistsError",
    "PoolHandle",
    "PoolNotFoundError",
    "PoolOverloadedError",
    "PoolSpec",
    "PoolStats",
    "PoolUnavailableError",
    "RaymoeError",
    "RemoteMoE",
    "RequestTooLargeError",
    "ResourceLimitError",
    "ShapeError",
    "StoreUnavailableError",
    "connect",
    "load_spec",
    "resume",
    "serve",
]
