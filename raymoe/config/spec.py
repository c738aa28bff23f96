"""The pool spec: one frozen, validated model; loading it from YAML or a dict; and the typed
helpers through which every runtime change makes the next spec (experts added or removed,
shards scaled, replicas pinned), each validated like a spec a user wrote.

Errors of any sort (bad YAML, unknown field, impossible combination) become one
:class:`raymoe.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
import yaml
from pydantic import Field, PositiveInt

from raymoe.config.routing import ROUTING_KINDS, RoutingSpec, SpecProblem, _Section
from raymoe.config.sections import (
    ControlSpec,
    ExpertSpec,
    GatewaySpec,
    LimitsSpec,
    ShardSpec,
    SharedSpec,
)
from raymoe.errors import ConfigError

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MAX_ADD = 1 << 20  # experts one add_experts call may create


class PoolSpec(_Section):
    """The experts of an MoE layer and how one pool serves them."""

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
        return self.routing.slots(self.num_experts)

    @property
    def pins(self) -> dict[int, int]:
        """The operator's replica targets (expert -> replicas): ``shards.replicas``."""
        return dict(self.shards.replicas)

    @pydantic.model_validator(mode="after")
    def _check_possible(self) -> PoolSpec:
        self.routing.check(self.num_experts)
        _check_removed(self)
        E, n = self.num_experts, self.shards.count
        if n > self.experts.live:
            raise SpecProblem("shards.count", f"{n} shards exceed {self.experts.live} live experts")
        for e, r in self.shards.replicas.items():
            if e >= E:
                raise SpecProblem("shards.replicas", f"expert {e} not in [0, {E})")
            if r > n:
                raise SpecProblem("shards.replicas", f"expert {e}: {r} replicas exceed {n} shards")
        c = self.control
        if c.max_shards is not None and c.max_shards < c.min_shards:
            raise SpecProblem("control.max_shards", "must not be below control.min_shards")
        if c.bias_update_rate > 0 and not getattr(self.routing, "correction_bias", False):
            raise SpecProblem(
                "control.bias_update_rate", "needs topk routing with correction_bias: true"
            )
        if self.routing.kind == "soft" and self.shared is not None:
            raise SpecProblem("shared", "soft routing mixes tokens into slots: no shared experts")
        if self.limits.max_batch_tokens > self.limits.max_request_tokens:
            raise SpecProblem("limits.max_batch_tokens", "must not exceed max_request_tokens")
        return self

    # --- the next spec, for each runtime change ------------------------------------------

    def with_experts_added(self, count: int) -> PoolSpec:
        """This spec with ``count`` more experts (ids ``E .. E+count-1``), or a ConfigError
        saying why it cannot grow."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_ADD:
            raise ConfigError(f"count must be an int in [1, {MAX_ADD}], got {count!r}", "count")
        routing = self.routing.grown(self.num_experts, count)
        experts = _replace(self.experts, num_experts=self.num_experts + count)
        return _replace(self, experts=experts, routing=routing)

    def with_experts_removed(self, ids) -> PoolSpec:
        """This spec with ``ids`` removed (and unpinned); they are never routed to again."""
        removed = sorted(set(self.experts.removed) | set(ids))
        pins = {e: r for e, r in self.shards.replicas.items() if e not in ids}
        experts = _replace(self.experts, removed=tuple(removed))
        return _replace(self, experts=experts, shards=_replace(self.shards, replicas=pins))

    def with_shards(self, count: int) -> PoolSpec:
        """This spec on ``count`` shards (pins capped at the shard count)."""
        pins = {e: min(r, count) for e, r in self.shards.replicas.items()}
        return _replace(self, shards=_replace(self.shards, count=count, replicas=pins))

    def with_pin(self, expert: int, replicas: int | None) -> PoolSpec:
        """This spec with ``expert`` pinned to ``replicas`` (None: unpinned)."""
        pins = {e: r for e, r in self.shards.replicas.items() if e != expert}
        if replicas is not None:
            pins[expert] = replicas
        return _replace(self, shards=_replace(self.shards, replicas=pins))

    def with_gateway(self, **changes) -> PoolSpec:
        """This spec with its gateway section changed (e.g. ``enabled=True, port=0``)."""
        return _replace(self, gateway=_replace(self.gateway, **changes))

    def with_name(self, name: str) -> PoolSpec:
        return _replace(self, name=name)

    # --- loading -------------------------------------------------------------------------

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


def _replace(model: _Section, **changes) -> Any:
    """``model`` with ``changes``, validated as a whole again (a ConfigError if impossible)."""
    data = {**dict(model), **changes}
    try:
        return type(model).model_validate(data)
    except pydantic.ValidationError as e:
        raise _config_error(e) from None


def _check_removed(spec: PoolSpec) -> None:
    removed, E = spec.experts.removed, spec.num_experts
    if not removed:
        return
    r = spec.routing
    if not r.removable:
        kinds = ", ".join(sorted(k for k, c in ROUTING_KINDS.items() if c.removable))
        raise SpecProblem(
            "experts.removed",
            f"{r.kind} routing cannot remove experts; routing kinds that can: {kinds}",
        )
    if removed[-1] >= E:
        raise SpecProblem("experts.removed", f"expert {removed[-1]} not in [0, {E})")
    live = spec.experts.live
    if live < r.min_live():
        raise SpecProblem(
            "experts.removed", f"{live} live experts left; routing needs {r.min_live()}"
        )
    pinned_removed = sorted(set(spec.shards.replicas) & set(removed))
    if pinned_removed:
        raise SpecProblem("shards.replicas", f"experts {pinned_removed[:5]} are removed")


def _config_error(e: pydantic.ValidationError) -> ConfigError:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in _UNION_TAGS)
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, SpecProblem):
        loc = cause.field
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
    return ConfigError(msg + more, field=loc or None)


# the tags pydantic puts in an error's location for a discriminated union member
_UNION_TAGS = {"ffn", "peer", *ROUTING_KINDS}


def load_spec(source: str | Path | dict | PoolSpec) -> PoolSpec:
    """Accept a spec in any form users hand us: a PoolSpec, a dict, a YAML path or string."""
    if isinstance(source, PoolSpec):
        return source
    if isinstance(source, dict):
        return PoolSpec.from_dict(source)
    return PoolSpec.from_yaml(source)
