"""raymoe: an elastic expert-pool service for Mixture-of-Experts models on Ray."""

from raymoe.api import PoolHandle, connect, serve
from raymoe.config import PoolSpec, load_spec
from raymoe.errors import (
    ConfigError,
    DeadlineExceededError,
    DTypeError,
    EmptyBatchError,
    ExpertIdError,
    InvalidInputError,
    LayoutError,
    NonFiniteError,
    PoolError,
    PoolExistsError,
    PoolNotFoundError,
    PoolOverloadedError,
    PoolUnavailableError,
    RaymoeError,
    RequestTooLargeError,
    ShapeError,
)
from raymoe.layer import MoEInfo, MoELayer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DTypeError",
    "DeadlineExceededError",
    "EmptyBatchError",
    "ExpertIdError",
    "InvalidInputError",
    "LayoutError",
    "MoEInfo",
    "MoELayer",
    "NonFiniteError",
    "PoolError",
    "PoolExistsError",
    "PoolHandle",
    "PoolNotFoundError",
    "PoolOverloadedError",
    "PoolSpec",
    "PoolUnavailableError",
    "RaymoeError",
    "RequestTooLargeError",
    "ShapeError",
    "connect",
    "load_spec",
    "serve",
]
