"""The one module that converts between protobuf messages and numpy arrays.

A ``raymoe.v1.Tensor`` is (dtype, shape, raw little-endian C-order bytes). Decoding checks
everything a peer could get wrong (unknown dtype, negative or too many dimensions, a shape
whose size disagrees with the byte length, a declared size over the limit) and raises
:class:`InvalidInputError` naming the field; it never allocates more than the bytes it got.
"""

from __future__ import annotations

import numpy as np

from raymoe.errors import DTypeError, InvalidInputError, RequestTooLargeError, ShapeError
from raymoe.v1 import tensor_pb2

MAX_DIMS = 8

_TO_NUMPY = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
}
_FROM_NUMPY = {v.newbyteorder("="): k for k, v in _TO_NUMPY.items()}


def to_tensor(a: np.ndarray) -> tensor_pb2.Tensor:
    """numpy -> Tensor (little-endian bytes, C order)."""
    a = np.asarray(a)
    try:
        dtype = _FROM_NUMPY[a.dtype.newbyteorder("=")]
    except KeyError:
        raise DTypeError(f"no wire dtype for {a.dtype}") from None
    data = np.ascontiguousarray(a, dtype=_TO_NUMPY[dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=a.shape, data=data)


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
