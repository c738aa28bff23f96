from raymoe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardRequest(_message.Message):
    __slots__ = ("x", "expert_ids", "weights", "token_ids", "request_id", "layer")
    X_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    x: _tensor_pb2.Tensor
    expert_ids: _tensor_pb2.Tensor
    weights: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    request_id: int
    layer: int
    def __init__(self, x: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., request_id: _Optional[int] = ..., layer: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "type", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    type: str
    message: str
    def __init__(self, code: _Optional[int] = ..., type: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("request_id", "y", "error", "degraded_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    y: _tensor_pb2.Tensor
    error: Error
    degraded_tokens: int
    def __init__(self, request_id: _Optional[int] = ..., y: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., degraded_tokens: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("window_s", "load_bins")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_BINS_FIELD_NUMBER: _ClassVar[int]
    window_s: float
    load_bins: int
    def __init__(self, window_s: _Optional[float] = ..., load_bins: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("requests", "tokens_per_s", "latency_p50_ms", "latency_p99_ms", "batch_tokens_mean", "batch_tokens_max", "pairs_per_shard", "imbalance", "expert_load", "counters", "window_s", "tokens", "load_map", "layer_imbalance")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_MEAN_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_MAX_FIELD_NUMBER: _ClassVar[int]
    PAIRS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MAP_FIELD_NUMBER: _ClassVar[int]
    LAYER_IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    requests: int
    tokens_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    batch_tokens_mean: float
    batch_tokens_max: int
    pairs_per_shard: _containers.RepeatedScalarFieldContainer[int]
    imbalance: float
    expert_load: _tensor_pb2.Tensor
    counters: _containers.ScalarMap[str, int]
    window_s: float
    tokens: int
    load_map: _tensor_pb2.Tensor
    layer_imbalance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, requests: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., batch_tokens_mean: _Optional[float] = ..., batch_tokens_max: _Optional[int] = ..., pairs_per_shard: _Optional[_Iterable[int]] = ..., imbalance: _Optional[float] = ..., expert_load: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., counters: _Optional[_Mapping[str, int]] = ..., window_s: _Optional[float] = ..., tokens: _Optional[int] = ..., load_map: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., layer_imbalance: _Optional[_Iterable[float]] = ...) -> None: ...
