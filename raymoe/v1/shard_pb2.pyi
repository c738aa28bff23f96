from raymoe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComputeRequest(_message.Message):
    __slots__ = ("x", "local_ids", "weights", "places_digest", "keep", "routing_version")
    X_FIELD_NUMBER: _ClassVar[int]
    LOCAL_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PLACES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    local_ids: _tensor_pb2.Tensor
    weights: _tensor_pb2.Tensor
    places_digest: int
    keep: int
    routing_version: int
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., local_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., places_digest: _Optional[int] = ..., keep: _Optional[int] = ..., routing_version: _Optional[int] = ...) -> None: ...

class ComputeReply(_message.Message):
    __slots__ = ("y",)
    Y_FIELD_NUMBER: _ClassVar[int]
    y: _tensor_pb2.Tensor
    def __init__(self, y: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("x", "local_ids", "weights", "grad_y", "places_digest", "keep")
    X_FIELD_NUMBER: _ClassVar[int]
    LOCAL_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_Y_FIELD_NUMBER: _ClassVar[int]
    PLACES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    local_ids: _tensor_pb2.Tensor
    weights: _tensor_pb2.Tensor
    grad_y: _tensor_pb2.Tensor
    places_digest: int
    keep: int
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., local_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_y: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., places_digest: _Optional[int] = ..., keep: _Optional[int] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad_x", "grad_weights")
    GRAD_X_FIELD_NUMBER: _ClassVar[int]
    GRAD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    grad_x: _tensor_pb2.Tensor
    grad_weights: _tensor_pb2.Tensor
    def __init__(self, grad_x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
