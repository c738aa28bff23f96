"""The one module that converts between protobuf messages and Python values.

Tensors, the gateway's replies (stats, describe, operation reports) and errors (raymoe error
classes <-> gRPC status codes) are converted here and nowhere else.

Replies are the typed values of :mod:`raymoe.reports`. A ``raymoe.v1.Tensor`` is (dtype,
shape, raw little-endian C-order bytes). Decoding checks everything a peer could get wrong
(unknown dtype, negative or too many dimensions, a shape whose size disagrees with the byte
length, a declared size over the limit) and raises :class:`InvalidInputError` naming the
field; it never allocates more than the bytes it got.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import grpc
import numpy as np

from raymoe import errors
from raymoe.errors import DTypeError, InvalidInputError, RequestTooLargeError, ShapeError
from raymoe.reports import Latency, OpReport, PoolDescription, PoolStats
from raymoe.v1 import admin_pb2, pool_pb2, tensor_pb2

MAX_DIMS = 8
MAX_DIM = 2**31 - 1  # the largest size of one dimension (numpy's limit is lower on 0 sizes)
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's own ceiling


def max_message_bytes(spec) -> int:
    """The largest message a pool carries: ``max_request_tokens`` tokens of float64 hidden
    states (times the rows each token may become: soft routing's slots) with every routing
    slot used (an int64 id and a float64 weight each) and a token id, plus room for the
    framing; at most gRPC's ceiling. The one size formula: the gateway and the shard
    endpoints both bound their messages with it."""
    rows = spec.rows_per_token
    per_token = rows * (spec.d_model * 8 + 16) + spec.slots * 16 + 8
    return min(spec.limits.max_request_tokens * per_token + (1 << 20), MAX_MESSAGE_BYTES)


_TO_NUMPY = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
}
_FROM_NUMPY = {v.newbyteorder("="): k for k, v in _TO_NUMPY.items()}


def _wire(a: np.ndarray) -> tuple[int, np.ndarray]:
    """(wire dtype, ``a`` little-endian and C-contiguous)."""
    try:
        dtype = _FROM_NUMPY[a.dtype.newbyteorder("=")]
    except KeyError:
        raise DTypeError(f"no wire dtype for {a.dtype}") from None
    return dtype, np.ascontiguousarray(a, dtype=_TO_NUMPY[dtype])


def to_tensor(a: np.ndarray) -> tensor_pb2.Tensor:
    """numpy -> Tensor (little-endian bytes, C order)."""
    a = np.asarray(a)
    dtype, data = _wire(a)
    return tensor_pb2.Tensor(dtype=dtype, shape=a.shape, data=data.tobytes())


# --- messages of big tensors, encoded by hand -----------------------------------------------
# NOTE: protobuf copies a tensor's bytes into the message and again when it serializes it
# (~24 ms for a shard's 8k-token sub-batch of 19 MB); these write the same wire format with
# one copy (a join of the headers and the arrays' buffers). Tests compare them byte for byte
# with what protobuf writes.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: ten bytes of two's complement, as protobuf writes it
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tensor_parts(field: int, a: np.ndarray) -> list:
    """Field ``field`` of a message: the Tensor of ``a`` -> [header, buffer]."""
    a = np.asarray(a)
    dtype, flat = _wire(a)
    flat = flat.reshape(-1)
    data = memoryview(flat.view(np.uint8)) if flat.size else b""
    head = bytearray(b"\x08" + _varint(dtype))
    if a.ndim:
        dims = b"".join(_varint(n) for n in a.shape)
        head += b"\x12" + _varint(len(dims)) + dims
    if len(data):
        head += b"\x1a" + _varint(len(data))
    size = len(head) + len(data)
    return [_varint(field << 3 | 2) + _varint(size) + bytes(head), data]


def encode_message(tensors: dict[int, np.ndarray], ints: dict[int, int | None]) -> bytes:
    """A message of Tensor fields (field number -> array) and optional int64 / uint64 fields
    (field number -> value, None: unset), in field-number order, as protobuf writes it."""
    parts: list = []
    for field in sorted(tensors):
        parts += _tensor_parts(field, tensors[field])
    for field in sorted(ints):
        if ints[field] is not None:
            parts.append(_varint(field << 3) + _varint(int(ints[field])))
    return b"".join(parts)


def from_tensor(t: tensor_pb2.Tensor, field: str, *, max_bytes: int | None = None) -> np.ndarray:
    """Tensor -> numpy (a read-only view of the message's bytes), validated."""
    dtype = _TO_NUMPY.get(t.dtype)
    if dtype is None:
        name = tensor_pb2.DType.Name(t.dtype) if t.dtype in tensor_pb2.DType.values() else t.dtype
        raise DTypeError(f"{field}: unsupported dtype {name}")
    shape = tuple(t.shape)
    if len(shape) > MAX_DIMS:
        raise ShapeError(f"{field}: {len(shape)} dimensions, at most {MAX_DIMS}")
    if any(n < 0 for n in shape):
        raise ShapeError(f"{field}: negative dimension in shape {list(shape)}")
    if any(n > MAX_DIM for n in shape):  # NOTE: before any arithmetic on the shape
        raise ShapeError(f"{field}: dimension over {MAX_DIM} in shape {list(shape)}")
    count = 1
    for n in shape:  # NOTE: Python ints: a huge declared shape cannot overflow
        count *= n
    nbytes = count * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise RequestTooLargeError(f"{field}: {nbytes} bytes declared, limit {max_bytes}")
    if nbytes != len(t.data):
        raise InvalidInputError(
            f"{field}: shape {list(shape)} of {dtype.name} needs {nbytes} bytes, got {len(t.data)}"
        )
    native = dtype.newbyteorder("=")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(native, copy=False)


# --- errors <-> status codes -----------------------------------------------------------------

Code = grpc.StatusCode
ERROR_TYPE_KEY = "raymoe-error"  # trailing metadata: the exact raymoe error class

# The most specific class wins (looked up along the MRO).
_CODE_OF: dict[type, grpc.StatusCode] = {
    errors.InvalidInputError: Code.INVALID_ARGUMENT,
    errors.ConfigError: Code.INVALID_ARGUMENT,
    errors.PoolOverloadedError: Code.RESOURCE_EXHAUSTED,
    errors.ResourceLimitError: Code.RESOURCE_EXHAUSTED,
    errors.DeadlineExceededError: Code.DEADLINE_EXCEEDED,
    errors.PoolUnavailableError: Code.UNAVAILABLE,
    errors.ShardNotReadyError: Code.UNAVAILABLE,
    errors.PoolNotFoundError: Code.NOT_FOUND,
    errors.PoolExistsError: Code.ALREADY_EXISTS,
    errors.AuthenticationError: Code.UNAUTHENTICATED,
    errors.PermissionDeniedError: Code.PERMISSION_DENIED,
    errors.PoolError: Code.INTERNAL,
    errors.RaymoeError: Code.INTERNAL,
}
# A status without the trailing metadata (from another server, or from gRPC itself).
_ERROR_OF: dict[grpc.StatusCode, type] = {
    Code.INVALID_ARGUMENT: errors.InvalidInputError,
    Code.OUT_OF_RANGE: errors.InvalidInputError,
    Code.RESOURCE_EXHAUSTED: errors.PoolOverloadedError,
    Code.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    Code.UNAVAILABLE: errors.PoolUnavailableError,
    Code.NOT_FOUND: errors.PoolNotFoundError,
    Code.ALREADY_EXISTS: errors.PoolExistsError,
    Code.UNAUTHENTICATED: errors.AuthenticationError,
    Code.PERMISSION_DENIED: errors.PermissionDeniedError,
}


def _error_classes() -> dict[str, type]:
    out, todo = {}, [errors.RaymoeError]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return out


_ERRORS_BY_NAME = {n: c for n, c in _error_classes().items() if c.__module__ == errors.__name__}


def status_of(error: errors.RaymoeError) -> tuple[grpc.StatusCode, str]:
    """(status code, raymoe error class name) of an error the gateway answers with."""
    for cls in type(error).__mro__:
        if cls in _CODE_OF:
            name = type(error).__name__
            return _CODE_OF[cls], name if name in _ERRORS_BY_NAME else cls.__name__
    return Code.INTERNAL, errors.RaymoeError.__name__


def error_of(code: grpc.StatusCode, message: str, type_name: str | None) -> errors.RaymoeError:
    """The raymoe error a client raises for a failed call."""
    cls = _ERRORS_BY_NAME.get(type_name or "")
    if cls is None and code == Code.RESOURCE_EXHAUSTED and "larger than max" in message:
        cls = errors.RequestTooLargeError  # gRPC's own message size limit
    if cls is None:
        cls = _ERROR_OF.get(code, errors.PoolError)
    err = cls.__new__(cls)
    Exception.__init__(err, message or code.name)
    if isinstance(err, errors.ConfigError):
        err.field = None
    return err


# --- replies: the typed values of raymoe.reports <-> protobuf --------------------------------


def stats_to_proto(s: PoolStats) -> pool_pb2.StatsReply:
    lat = s.latency
    return pool_pb2.StatsReply(
        requests=s.requests,
        tokens=s.tokens,
        window_s=s.window_s,
        tokens_per_s=s.tokens_per_s,
        latency_p50_ms=lat.p50_ms if lat else None,
        latency_p99_ms=lat.p99_ms if lat else None,
        batch_tokens_mean=s.batch_tokens_mean,
        batch_tokens_max=s.batch_tokens_max,
        pairs_per_shard=s.pairs_per_shard,
        imbalance=s.imbalance,
        expert_load=to_tensor(np.asarray(s.expert_load, np.int64)),
        counters=s.counters,
        load_map=None if s.load_map is None else to_tensor(np.asarray(s.load_map, np.float64)),
        layer_imbalance=s.layer_imbalance,
    )


def stats_from_proto(m: pool_pb2.StatsReply) -> PoolStats:
    lat = Latency(m.latency_p50_ms, m.latency_p99_ms) if m.HasField("latency_p50_ms") else None
    return PoolStats(
        window_s=m.window_s,
        requests=m.requests,
        tokens=m.tokens,
        tokens_per_s=m.tokens_per_s,
        latency=lat,
        batch_tokens_mean=m.batch_tokens_mean if m.HasField("batch_tokens_mean") else None,
        batch_tokens_max=m.batch_tokens_max if m.HasField("batch_tokens_max") else None,
        pairs_per_shard=tuple(m.pairs_per_shard),
        imbalance=m.imbalance,
        expert_load=from_tensor(m.expert_load, "expert_load").copy(),
        counters=dict(m.counters),
        load_map=from_tensor(m.load_map, "load_map").copy() if m.HasField("load_map") else None,
        layer_imbalance=tuple(m.layer_imbalance),
    )


def describe_to_proto(d: PoolDescription) -> admin_pb2.DescribeReply:
    return _to_proto(d, admin_pb2.DescribeReply, spec=("spec_json", json.dumps))


def describe_from_proto(m: admin_pb2.DescribeReply) -> PoolDescription:
    return _from_proto(m, PoolDescription, spec=lambda m: json.loads(m.spec_json))


def report_to_proto(r: OpReport) -> admin_pb2.OperationReport:
    return _to_proto(r, admin_pb2.OperationReport)


def report_from_proto(m: admin_pb2.OperationReport) -> OpReport:
    return _from_proto(m, OpReport)


def _to_proto(value, message_cls, **special):
    """A message from a report dataclass whose fields have the message's names (``special``:
    field -> (message field, conversion))."""
    fields = {}
    for f in dataclasses.fields(value):
        name, convert = special.get(f.name, (f.name, None))
        v = getattr(value, f.name)
        fields[name] = convert(v) if convert else v
    return message_cls(**fields)


def _from_proto(message, cls, **special):
    """The report dataclass ``cls`` from a message with its fields' names (repeated fields
    become tuples, maps dicts; ``special``: field -> function of the message)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in special:
            out[f.name] = special[f.name](message)
            continue
        v = getattr(message, f.name)
        if isinstance(v, Mapping):
            v = dict(v)
        elif not isinstance(v, str | bytes | int | float | bool):
            v = tuple(v)
        out[f.name] = v
    return cls(**out)
