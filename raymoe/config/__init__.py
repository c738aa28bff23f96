"""Pool specs: what users write in YAML, validated into typed, frozen models.

A :class:`PoolSpec` describes the experts of an MoE layer and how one pool serves them: the
model width, the expert kind, the routing kind, the shared experts, the sharding, the
controller's rules, the gateway and the limits. The ``experts`` and ``routing`` sections are
chosen by their ``kind`` field, so an unknown kind is reported together with the valid ones;
each routing kind declares its capabilities (:mod:`raymoe.config.routing`).
"""

from raymoe.config.routing import (
    ROUTING_KINDS,
    DenseRouting,
    ExpertChoiceRouting,
    HashRouting,
    HierarchicalRouting,
    ProductKeyRouting,
    RoutingSpec,
    SoftRouting,
    SpecProblem,
    SwitchRouting,
    TopKRouting,
)
from raymoe.config.sections import (
    Activation,
    ClampedSwiGLU,
    ControlSpec,
    ExpertSpec,
    FaultSpec,
    FFNExperts,
    GatewaySpec,
    LimitsSpec,
    PeerExperts,
    ShardSpec,
    SharedSpec,
)
from raymoe.config.spec import MAX_ADD, PoolSpec, load_spec

__all__ = [
    "MAX_ADD",
    "ROUTING_KINDS",
    "Activation",
    "ClampedSwiGLU",
    "ControlSpec",
    "DenseRouting",
    "ExpertChoiceRouting",
    "ExpertSpec",
    "FFNExperts",
    "FaultSpec",
    "GatewaySpec",
    "HashRouting",
    "HierarchicalRouting",
    "LimitsSpec",
    "PeerExperts",
    "PoolSpec",
    "ProductKeyRouting",
    "RoutingSpec",
    "ShardSpec",
    "SharedSpec",
    "SoftRouting",
    "SpecProblem",
    "SwitchRouting",
    "TopKRouting",
    "load_spec",
]
