"""The sections of a pool spec other than routing: experts, shared experts, shards, the
controller's rules, the gateway and the limits. Frozen pydantic models with constrained fields;
the experts section is chosen by its ``kind``."""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from raymoe.config.routing import _Section

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]


class _Experts(_Section):
    """``num_experts`` counts every id ever created; ``removed`` ids are never routed to
    again (ids are stable: an id is never reused, so client routes keep their meaning)."""

    num_experts: PositiveInt
    removed: tuple[NonNegativeInt, ...] = ()

    @pydantic.field_validator("removed")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if list(v) != sorted(set(v)):
            raise ValueError("removed expert ids must be sorted and unique")
        return v

    @property
    def live(self) -> int:
        return self.num_experts - len(self.removed)


class ClampedSwiGLU(_Section):
    """GPT-OSS's gated nonlinearity, in place of ``act(gate) * up``:
    ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""

    alpha: PositiveFloat = 1.702
    limit: PositiveFloat = 7.0


class FFNExperts(_Experts):
    """FFN experts: gated ``down(act(gate x) * up x)`` or plain ``out(act(in x))``.

    clamped_swiglu: GPT-OSS experts (gated only; ``activation`` is then unused)
    weight_input:   the routing weight scales the expert's input, ``E(w x)``, instead of its
                    output, ``w E(x)`` (Llama 4)
    """

    kind: Literal["ffn"] = "ffn"
    hidden: PositiveInt
    gated: bool = True
    activation: Activation = "silu"
    bias: bool = False
    clamped_swiglu: ClampedSwiGLU | None = None
    weight_input: bool = False

    @pydantic.model_validator(mode="after")
    def _clamped_is_gated(self) -> FFNExperts:
        if self.clamped_swiglu is not None and not self.gated:
            raise ValueError("clamped_swiglu needs gated: true")
        return self


class PeerExperts(_Experts):
    """Single-neuron experts (PEER): ``E_i(x) = v_i * act(u_i · x)``."""

    kind: Literal["peer"] = "peer"
    activation: Activation = "gelu"
    sparse_grad: bool = True


ExpertSpec = Annotated[FFNExperts | PeerExperts, Field(discriminator="kind")]


class SharedSpec(_Section):
    """Shared expert(s) applied to every token: one gated FFN of width ``hidden``."""

    hidden: PositiveInt
    gate: bool = False


class ShardSpec(_Section):
    """How the pool is laid out on Ray."""

    count: PositiveInt = 1
    routers: PositiveInt = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(0.0, ge=0.0)
    transport: Literal["object_store", "grpc"] = "object_store"
    # torch intra-op threads per actor (Ray gives every worker 1); a router gating a
    # product-key pool is compute-bound and gains from 2 when cores are free
    shard_threads: PositiveInt = 1
    router_threads: PositiveInt = 1
    # pins: the operator's replica targets, expert id -> replica count (>= 1, at most
    # ``count``), kept by every plan (``pool.pin`` changes them at runtime); the extra
    # replicas start on the shards after the expert's own
    replicas: dict[NonNegativeInt, PositiveInt] = Field(default_factory=dict)
    # failure domains: every expert not pinned keeps at least this many replicas, on
    # distinct shards and on as many distinct Ray nodes as hold shards (shards are then
    # spread over the nodes), so one shard's or one node's failure leaves it served
    min_replicas: int = Field(1, ge=1, le=16)
    # warm spare shard processes (torch loaded, no experts): when a shard's process dies,
    # a spare loads its experts and serves in its place until Ray has restarted it (a
    # restart imports torch anew: seconds under load; a spare takes a fraction of one)
    spares: int = Field(0, ge=0, le=16)
    # training: each shard keeps the activations of training forwards for their backward,
    # up to this many MB (the oldest go first; a backward whose activations are gone
    # recomputes its forward); 0 = always recompute
    activation_window_mb: int = Field(512, ge=0, le=65536)


class ControlSpec(_Section):
    """What the controller does on its own, and the bounds of what it may do."""

    load_half_life_s: PositiveFloat = 30.0  # decay of the per-expert load window
    target_imbalance: float = Field(1.05, ge=1.0)  # max / mean shard load a rebalance aims at
    # plans aim at 1 + plan_margin * (target_imbalance - 1): load that drifts a little after a
    # plan (a window still following a shift of the hot set) stays under the target
    plan_margin: float = Field(0.5, gt=0.0, le=1.0)
    extra_replicas: float = Field(0.05, ge=0.0, le=8.0)  # replica budget beyond E, share of E
    capacity: PositiveInt | None = None  # replicas one shard may hold (None: unbounded)
    policy: str = "balanced"  # a name in raymoe.placement.POLICIES
    auto_rebalance: bool = False  # rebalance when imbalance exceeds the target
    rebalance_interval_s: PositiveFloat = 10.0
    drain_timeout_s: PositiveFloat = 60.0  # longest wait for batches under an old placement
    # autoscaling of the shard count from measured tokens/s, with hysteresis: up when a
    # shard carries more than the target, down only when one shard fewer would carry at most
    # ``scale_down_below`` of it, never twice within ``scale_cooldown_s``
    autoscale: bool = False
    min_shards: PositiveInt = 1
    max_shards: PositiveInt | None = None  # None: the live expert count
    target_tokens_per_shard_s: PositiveFloat = 50_000.0
    scale_down_below: float = Field(0.6, gt=0.0, lt=1.0)
    scale_cooldown_s: float = Field(30.0, ge=0.0)
    # aux-loss-free balancing (DeepSeek-V3): topk routing with a correction bias moves each
    # expert's bias by this much per control step towards the mean load (0: off)
    bias_update_rate: float = Field(0.0, ge=0.0, le=1.0)

    @pydantic.field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from raymoe.placement import POLICIES

        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; valid: {sorted(POLICIES)}")
        return v


class LimitsSpec(_Section):
    """Bounds on everything a client can make the pool do."""

    max_request_tokens: PositiveInt = 65536
    max_batch_tokens: PositiveInt = 16384
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    max_queued_requests: PositiveInt = 1024
    request_timeout_s: PositiveFloat = 60.0
    allow_nonfinite: bool = False
    # a PoolHandle sends requests of at most this many tokens from the caller's thread
    # straight to the shards (one at a time per handle; more go through a router, which
    # batches them); 0: every request through a router
    direct_max_tokens: int = Field(64, ge=0, le=4096)
    # expert bytes the pool may hold over all replicas; an admin change past it is refused
    # (ResourceLimitError). None: 80% of the memory Ray reports for the cluster's nodes
    max_pool_bytes: PositiveInt | None = None


class FaultSpec(_Section):
    """What the data path does when shards fail or go silent (a dead node's shards answer
    nothing until Ray declares the node dead, which takes many seconds)."""

    # a sub-batch whose shard has not answered within this, and within 4x the slowest of
    # its batch's answered sub-batches and of the router's typical call, is sent again to
    # other replicas of its experts (the first answer counts)
    hedge_after_s: float = Field(0.1, gt=0.0, le=60.0)
    # a shard that failed or went silent gets no pairs another replica can take for this
    # long (or until it answers)
    suspect_s: float = Field(2.0, ge=0.0, le=600.0)
    # every replica of an expert unreachable: "fail" waits for one until the request's
    # deadline, then fails the request; "degrade" drops the expert from the tokens that
    # chose it after degrade_after_s, renormalises their remaining weights, and flags them
    on_unreachable: Literal["fail", "degrade"] = "fail"
    degrade_after_s: float = Field(1.0, gt=0.0, le=600.0)
    # degrade: scale a token's remaining experts up to its whole routing weight (hivemind's
    # rule), or keep their weights (bench_degraded.py measures both)
    renormalise: bool = True


class GatewaySpec(_Section):
    """The pool's public gRPC gateway (data plane and admin plane; see ``protos/``).

    Tokens are read by the gateway process from a file (a mounted Kubernetes Secret) or, when
    no file is named, from an environment variable; never from the spec itself. The data plane
    is open when no data token is configured; the admin plane is closed when no admin token is.
    The admin token is accepted on the data plane too.
    """

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(50051, ge=0, le=65535)  # 0: a free port (see PoolHandle.gateways())
    per_node: bool = False  # one on every node, joining ones too (each on `port`); else one
    max_inflight: PositiveInt = 256  # concurrent forward calls; more get RESOURCE_EXHAUSTED
    stream_window: PositiveInt = 8  # requests of one stream computed at once
    data_token_file: str | None = None
    admin_token_file: str | None = None
    data_token_env: str = "RAYMOE_DATA_TOKEN"
    admin_token_env: str = "RAYMOE_ADMIN_TOKEN"
    tls_cert_file: str | None = None  # PEM; with tls_key_file: serve TLS
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # PEM; set: clients must present a certificate

    @pydantic.model_validator(mode="after")
    def _tls_pair(self) -> GatewaySpec:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self
