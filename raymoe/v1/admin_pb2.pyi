from raymoe.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("placement_version", "manifest_json")
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    placement_version: int
    manifest_json: str
    def __init__(self, placement_version: _Optional[int] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("name", "spec_json", "placement_version", "shards", "routers", "experts", "replicas", "experts_per_shard", "degraded", "removed", "last_change_s", "routing_version", "live_experts", "pinned", "drained", "resumed_changes", "layers", "live_per_layer")
    class LastChangeSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PinnedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_S_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIVE_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_CHANGES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    placement_version: int
    shards: int
    routers: int
    experts: int
    replicas: int
    experts_per_shard: _containers.RepeatedScalarFieldContainer[int]
    degraded: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[int]
    last_change_s: _containers.ScalarMap[str, float]
    routing_version: int
    live_experts: int
    pinned: _containers.ScalarMap[int, int]
    drained: _containers.RepeatedScalarFieldContainer[int]
    resumed_changes: int
    layers: int
    live_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ..., placement_version: _Optional[int] = ..., shards: _Optional[int] = ..., routers: _Optional[int] = ..., experts: _Optional[int] = ..., replicas: _Optional[int] = ..., experts_per_shard: _Optional[_Iterable[int]] = ..., degraded: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[int]] = ..., last_change_s: _Optional[_Mapping[str, float]] = ..., routing_version: _Optional[int] = ..., live_experts: _Optional[int] = ..., pinned: _Optional[_Mapping[int, int]] = ..., drained: _Optional[_Iterable[int]] = ..., resumed_changes: _Optional[int] = ..., layers: _Optional[int] = ..., live_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("dry_run", "policy")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    policy: str
    def __init__(self, dry_run: _Optional[bool] = ..., policy: _Optional[str] = ...) -> None: ...

class ReplicaRequest(_message.Message):
    __slots__ = ("expert_id", "replicas", "layer")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    expert_id: int
    replicas: int
    layer: int
    def __init__(self, expert_id: _Optional[int] = ..., replicas: _Optional[int] = ..., layer: _Optional[int] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("expert_id", "layer")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    expert_id: int
    layer: int
    def __init__(self, expert_id: _Optional[int] = ..., layer: _Optional[int] = ...) -> None: ...

class DrainShardRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: int
    def __init__(self, shard: _Optional[int] = ...) -> None: ...

class ScaleShardsRequest(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class AddExpertsRequest(_message.Message):
    __slots__ = ("count", "weights", "layer")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    count: int
    weights: _containers.MessageMap[str, _tensor_pb2.Tensor]
    layer: int
    def __init__(self, count: _Optional[int] = ..., weights: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., layer: _Optional[int] = ...) -> None: ...

class RemoveExpertsRequest(_message.Message):
    __slots__ = ("expert_ids", "layer")
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    layer: int
    def __init__(self, expert_ids: _Optional[_Iterable[int]] = ..., layer: _Optional[int] = ...) -> None: ...

class OperationReport(_message.Message):
    __slots__ = ("version", "replicas_added", "replicas_dropped", "bytes_moved", "imbalance_before", "imbalance_after", "dry_run", "policy", "expert_ids", "removed", "pinned", "layer")
    class PinnedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_ADDED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    version: int
    replicas_added: int
    replicas_dropped: int
    bytes_moved: int
    imbalance_before: float
    imbalance_after: float
    dry_run: bool
    policy: str
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    pinned: _containers.ScalarMap[int, int]
    layer: int
    def __init__(self, version: _Optional[int] = ..., replicas_added: _Optional[int] = ..., replicas_dropped: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., imbalance_before: _Optional[float] = ..., imbalance_after: _Optional[float] = ..., dry_run: _Optional[bool] = ..., policy: _Optional[str] = ..., expert_ids: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ..., pinned: _Optional[_Mapping[int, int]] = ..., layer: _Optional[int] = ...) -> None: ...
