"""Pool specs: what users write in YAML, validated into typed, frozen models.

A :class:`PoolSpec` describes one MoE layer served by one pool: the model width, the expert
kind, the routing kind, the shared experts, how the pool is sharded and its limits. Every
section is a frozen pydantic model; the ``experts`` and ``routing`` sections are chosen by
their ``kind`` field, so an unknown kind is reported together with the valid ones.

Errors of any sort (bad YAML, unknown field, impossible combination) become one
:class:`raymoe.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from raymoe.errors import ConfigError

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- experts -------------------------------------------------------------------------------


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


class FFNExperts(_Experts):
    """FFN experts: gated ``down(act(gate x) * up x)`` or plain ``out(act(in x))``."""

    kind: Literal["ffn"] = "ffn"
    hidden: PositiveInt
    gated: bool = True
    activation: Activation = "silu"
    bias: bool = False


class PeerExperts(_Experts):
    """Single-neuron experts (PEER): ``E_i(x) = v_i * act(u_i · x)``."""

    kind: Literal["peer"] = "peer"
    activation: Activation = "gelu"
    sparse_grad: bool = True


ExpertSpec = Annotated[FFNExperts | PeerExperts, Field(discriminator="kind")]


# --- routing -------------------------------------------------------------------------------


class _Routing(_Section):
    aux_loss_coef: float = Field(0.0, ge=0.0)
    z_loss_coef: float = Field(0.0, ge=0.0)


class TopKRouting(_Routing):
    """Softmax/sigmoid top-k gating (Mixtral, Qwen, OLMoE, DeepSeek-V3, Shazeer's noisy top-k)."""

    kind: Literal["topk"] = "topk"
    k: PositiveInt
    score: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False
    scaling: float = 1.0
    bias: bool = False
    correction_bias: bool = False
    noise: bool = False
    n_groups: PositiveInt | None = None
    topk_groups: PositiveInt | None = None
    group_score: Literal["max", "top2_sum"] = "top2_sum"


class SwitchRouting(_Routing):
    """Top-1 with capacity; a token over capacity is dropped and gets zero from the layer."""

    kind: Literal["switch"] = "switch"
    capacity_factor: PositiveFloat | None = None  # 1.0 when neither this nor capacity is set
    capacity: PositiveInt | None = None
    capacity_scope: Literal["batch", "sequence"] = "batch"


class ExpertChoiceRouting(_Routing):
    """Each expert takes its top-c tokens, c = ceil(capacity_factor * T * k / E)."""

    kind: Literal["expert_choice"] = "expert_choice"
    k: PositiveInt = 1
    capacity_factor: PositiveFloat = 1.0


class HashRouting(_Routing):
    """A fixed, balanced random hash of token id to one expert (Roller et al. 2021)."""

    kind: Literal["hash"] = "hash"
    vocab_size: PositiveInt
    seed: int = 0


class ProductKeyRouting(_Routing):
    """Multi-head product-key retrieval over rows x columns sub-keys (PEER, Lample 2019):
    expert ``i * columns + j`` pairs row key ``i`` with column key ``j``. ``columns`` defaults
    to sqrt(N) (a square grid); a pool grows by whole rows of ``columns`` experts."""

    kind: Literal["product_key"] = "product_key"
    heads: PositiveInt = 8
    k: PositiveInt = 16
    d_key: PositiveInt = 128
    query_batchnorm: bool = False
    columns: PositiveInt | None = None

    def grid(self, num_experts: int) -> tuple[int, int]:
        """(rows, columns) of the sub-key grid for ``num_experts``."""
        cols = self.columns or math.isqrt(num_experts)
        return num_experts // cols, cols


class HierarchicalRouting(_Routing):
    """Two-level gating: softmax over groups, top ``k_groups``; softmax inside, top ``k``."""

    kind: Literal["hierarchical"] = "hierarchical"
    n_groups: PositiveInt
    k_groups: PositiveInt = 1
    k: PositiveInt = 1


class DenseRouting(_Routing):
    """Every expert, softmax-weighted (the original mixture of experts)."""

    kind: Literal["dense"] = "dense"


RoutingSpec = Annotated[
    TopKRouting
    | SwitchRouting
    | ExpertChoiceRouting
    | HashRouting
    | ProductKeyRouting
    | HierarchicalRouting
    | DenseRouting,
    Field(discriminator="kind"),
]


# --- the rest ------------------------------------------------------------------------------


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
    # operator's replica targets: expert id -> replica count (>= 1, at most ``count``); the
    # extra replicas go on the shards after the expert's own, and routers spread its tokens
    replicas: dict[NonNegativeInt, PositiveInt] = {}


class ControlSpec(_Section):
    """What the controller does on its own, and the bounds of what it may do."""

    load_half_life_s: PositiveFloat = 30.0  # decay of the per-expert load window
    target_imbalance: float = Field(1.05, ge=1.0)  # max / mean shard load a rebalance aims at
    # plans aim at 1 + plan_margin * (target_imbalance - 1): load that drifts a little after a
    # plan (a window still following a shift of the hot set) stays under the target
    plan_margin: float = Field(0.5, gt=0.0, le=1.0)
    extra_replicas: float = Field(0.05, ge=0.0, le=8.0)  # replica budget beyond E, share of E
    capacity: PositiveInt | None = None  # replicas one shard may hold (None: unbounded)
    policy: Literal["incremental", "eplb"] = "incremental"
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


class LimitsSpec(_Section):
    """Bounds on everything a client can make the pool do."""

    max_request_tokens: PositiveInt = 65536
    max_batch_tokens: PositiveInt = 16384
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    max_queued_requests: PositiveInt = 1024
    request_timeout_s: PositiveFloat = 60.0
    allow_nonfinite: bool = False


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


class PoolSpec(_Section):
    """One MoE layer, served by one pool."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    d_model: PositiveInt
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    seed: int = 0
    experts: ExpertSpec
    routing: RoutingSpec
    shared: SharedSpec | None = None
    shards: ShardSpec = ShardSpec()
    limits: LimitsSpec = LimitsSpec()
    control: ControlSpec = ControlSpec()
    gateway: GatewaySpec = GatewaySpec()

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def slots(self) -> int:
        """Columns of the ``[T, slots]`` expert-id tensor that routing produces (upper bound)."""
        r = self.routing
        if isinstance(r, ProductKeyRouting):
            return r.heads * r.k
        if isinstance(r, HierarchicalRouting):
            return r.k_groups * r.k
        if isinstance(r, (SwitchRouting, HashRouting)):
            return 1
        if isinstance(r, (DenseRouting, ExpertChoiceRouting)):
            return self.num_experts
        return r.k

    @pydantic.model_validator(mode="after")
    def _check_possible(self) -> PoolSpec:
        _check_routing(self.routing, self.num_experts)
        _check_removed(self)
        if self.shards.count > self.num_experts:
            raise SpecProblem(
                "shards.count", f"{self.shards.count} shards exceed {self.num_experts} experts"
            )
        for e, r in self.shards.replicas.items():
            if e >= self.num_experts:
                raise SpecProblem("shards.replicas", f"expert {e} not in [0, {self.num_experts})")
            if r > self.shards.count:
                raise SpecProblem(
                    "shards.replicas", f"expert {e}: {r} replicas exceed {self.shards.count} shards"
                )
        c = self.control
        if c.max_shards is not None and c.max_shards < c.min_shards:
            raise SpecProblem("control.max_shards", "must not be below control.min_shards")
        if c.bias_update_rate > 0 and not getattr(self.routing, "correction_bias", False):
            raise SpecProblem("control.bias_update_rate",
                              "needs topk routing with correction_bias: true")  # fmt: skip
        if self.limits.max_batch_tokens > self.limits.max_request_tokens:
            raise SpecProblem("limits.max_batch_tokens", "must not exceed max_request_tokens")
        return self

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> PoolSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"a pool spec must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as e:
            raise _config_error(e) from None

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> PoolSpec:
        """Load from a YAML file path or a YAML string."""
        text = str(text_or_path)
        path = Path(text)
        if "\n" not in text and path.suffix in (".yaml", ".yml"):
            try:
                text = path.read_text()
            except OSError as e:
                raise ConfigError(f"cannot read {path}: {e.strerror}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class SpecProblem(ValueError):
    """An impossible combination, raised inside validation with the field it concerns."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def _check_routing(r: Any, num_experts: int) -> None:
    """Reject routing specs that cannot route (reported by pydantic with the field)."""
    E = num_experts

    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            raise SpecProblem(f"routing.{field}", message)

    if isinstance(r, (TopKRouting, ExpertChoiceRouting)):
        need(r.k <= E, "k", f"k={r.k} exceeds experts.num_experts={E}")
    if isinstance(r, TopKRouting):
        need((r.n_groups is None) == (r.topk_groups is None), "n_groups",
             "n_groups and topk_groups must be given together")  # fmt: skip
        if r.n_groups is not None:
            need(E % r.n_groups == 0, "n_groups", f"n_groups={r.n_groups} does not divide {E}")
            need(r.topk_groups <= r.n_groups, "topk_groups", "topk_groups exceeds n_groups")
            per_group = E // r.n_groups
            need(r.topk_groups * per_group >= r.k, "topk_groups",
                 f"{r.topk_groups} groups of {per_group} experts leave fewer than k={r.k} "
                 "experts")  # fmt: skip
            need(r.group_score != "top2_sum" or per_group >= 2, "group_score",
                 "top2_sum needs >= 2 experts per group")  # fmt: skip
    elif isinstance(r, SwitchRouting):
        need(r.capacity is None or r.capacity_factor is None, "capacity",
             "give capacity or capacity_factor, not both")  # fmt: skip
    elif isinstance(r, ProductKeyRouting):
        root = math.isqrt(E)
        if r.columns is None:
            need(root * root == E, "kind", f"product_key needs a square expert count, got {E}")
        else:
            need(E % r.columns == 0, "columns",
                 f"{E} experts are not whole rows of {r.columns} columns")  # fmt: skip
        rows, cols = r.grid(E)
        need(r.k <= min(rows, cols), "k",
             f"k={r.k} exceeds the {min(rows, cols)} sub-keys of the smaller half")  # fmt: skip
        need(r.d_key % 2 == 0, "d_key", f"d_key={r.d_key} must be even")
    elif isinstance(r, HierarchicalRouting):
        need(E % r.n_groups == 0, "n_groups", f"n_groups={r.n_groups} does not divide {E}")
        need(r.k_groups <= r.n_groups, "k_groups", "k_groups exceeds n_groups")
        need(
            r.k <= E // r.n_groups, "k", f"k={r.k} exceeds the {E // r.n_groups} experts per group"
        )


# routing kinds whose experts can be removed at runtime (the gate masks them out)
REMOVABLE = ("topk", "dense", "product_key")


def _check_removed(spec: PoolSpec) -> None:
    removed, E = spec.experts.removed, spec.num_experts
    if not removed:
        return
    if spec.routing.kind not in REMOVABLE:
        raise SpecProblem("experts.removed", f"{spec.routing.kind} routing cannot remove experts; "
                          f"routing kinds that can: {', '.join(REMOVABLE)}")  # fmt: skip
    if removed[-1] >= E:
        raise SpecProblem("experts.removed", f"expert {removed[-1]} not in [0, {E})")
    live = E - len(removed)
    k = getattr(spec.routing, "k", 1) if spec.routing.kind == "topk" else 1
    if live < max(k, 1):
        need = max(k, 1)
        raise SpecProblem("experts.removed", f"{live} live experts left; routing needs {need}")
    if spec.shards.count > live:
        raise SpecProblem("shards.count", f"{spec.shards.count} shards exceed {live} live experts")
    pinned_removed = sorted(set(spec.shards.replicas) & set(removed))
    if pinned_removed:
        raise SpecProblem("shards.replicas", f"experts {pinned_removed[:5]} are removed")


def _config_error(e: pydantic.ValidationError) -> ConfigError:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, SpecProblem):
        loc = cause.field
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
    return ConfigError(msg + more, field=loc or None)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in _UNION_TAGS


_UNION_TAGS = {
    "ffn", "peer", "topk", "switch", "expert_choice", "hash", "product_key", "hierarchical",
    "dense",
}  # fmt: skip


def load_spec(source: str | Path | dict | PoolSpec) -> PoolSpec:
    """Accept a spec in any form users hand us: a PoolSpec, a dict, a YAML path or string."""
    if isinstance(source, PoolSpec):
        return source
    if isinstance(source, dict):
        return PoolSpec.from_dict(source)
    return PoolSpec.from_yaml(source)
