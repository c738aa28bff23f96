"""The pool spec: one frozen, validated model; loading it from YAML or a dict; and the typed
helpers through which every runtime change makes the next spec (experts added or removed,
shards scaled, replicas pinned), each validated like a spec a user wrote.

Errors of any sort (bad YAML, unknown field, impossible combination) become one
:class:`raymoe.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch
import yaml
from pydantic import Field, NonNegativeInt, PositiveInt

from raymoe.config.layers import MAX_LAYERS, FlatIds, LayerSpec
from raymoe.config.routing import ROUTING_KINDS, RoutingSpec, SpecProblem, _Section
from raymoe.config.sections import (
    ControlSpec,
    ExpertSpec,
    FaultSpec,
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
    """The experts of an MoE layer, or of a model's MoE layers, and how one pool serves them.

    Multi-layer (``layers``: a count, or a list of per-layer overrides): the ``experts``,
    ``routing`` and ``shared`` sections are every layer's template, and layer ``l`` is
    exactly the single-layer spec :meth:`layer` (``l``). Expert ids of the pool as a whole
    (placement, pins, the load) are flat ids (:mod:`raymoe.config.layers`).
    """

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
    faults: FaultSpec = FaultSpec()
    gateway: GatewaySpec = GatewaySpec()
    layers: tuple[LayerSpec, ...] = ()
    id_blocks: tuple[tuple[NonNegativeInt, PositiveInt], ...] = ()

    @pydantic.model_validator(mode="before")
    @classmethod
    def _layer_count(cls, data: Any) -> Any:
        """``layers: N`` is N layers like the template."""
        if isinstance(data, dict) and isinstance(data.get("layers"), int):
            n = data["layers"]
            if isinstance(n, bool) or not 1 <= n <= MAX_LAYERS:
                raise SpecProblem("layers", f"layers must be in [1, {MAX_LAYERS}], got {n!r}")
            data = {**data, "layers": [{}] * n}
        return data

    # --- layers and flat ids -------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return max(1, len(self.layers))

    @property
    def multi_layer(self) -> bool:
        return bool(self.layers)

    def layer(self, index: int) -> PoolSpec:
        """Layer ``index`` as a single-layer spec (its gate and shared experts are seeded
        with ``seed + index``; a single-layer spec's layer 0 is itself)."""
        if not self.layers:
            if index != 0:
                raise SpecProblem("layer", f"layer {index} is not in [0, 1)")
            return self
        return self._layer_specs[index]

    @cached_property
    def _layer_specs(self) -> tuple[PoolSpec, ...]:
        return tuple(_layer_spec(self, i, ls) for i, ls in enumerate(self.layers))

    @cached_property
    def flat(self) -> FlatIds:
        """The flat id of every (layer, expert)."""
        return FlatIds(self.blocks, self.num_layers)

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """Flat ids in blocks ``(layer, count)``, in creation order."""
        if self.id_blocks:
            return self.id_blocks
        if not self.layers:
            return ((0, self.experts.num_experts),)
        return tuple((i, s.experts.num_experts) for i, s in enumerate(self._layer_specs))

    @property
    def num_experts(self) -> int:
        """Experts of every layer (flat ids ``[0, E)``), removed ones included."""
        if not self.layers:
            return self.experts.num_experts
        return sum(count for _, count in self.blocks)

    @cached_property
    def removed_ids(self) -> tuple[int, ...]:
        """Flat ids of the removed experts, sorted."""
        if not self.layers:
            return self.experts.removed
        flat = self.flat
        ids = [flat.flat(i, s.experts.removed) for i, s in enumerate(self._layer_specs)]
        return tuple(sorted(int(e) for e in np.concatenate(ids)))

    @property
    def live_experts(self) -> int:
        return self.num_experts - len(self.removed_ids)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def slots(self) -> int:
        """Columns of the ``[T, slots]`` expert-id tensor that routing produces (upper bound,
        over the layers)."""
        if self.layers:
            return max(s.slots for s in self._layer_specs)
        return self.routing.slots(self.num_experts)

    @property
    def rows_per_token(self) -> int:
        """Rows the experts compute per token (upper bound, over the layers)."""
        layers = map(self.layer, range(self.num_layers))
        return max(s.routing.rows_per_token(s.num_experts) for s in layers)

    @property
    def pins(self) -> dict[int, int]:
        """The operator's replica targets (expert -> replicas): ``shards.replicas``."""
        return dict(self.shards.replicas)

    @pydantic.model_validator(mode="after")
    def _check_possible(self) -> PoolSpec:
        if self.layers:
            _check_layers(self)
        else:
            self.routing.check(self.num_experts)
            _check_removed(self)
        E, n = self.num_experts, self.shards.count
        if n > self.live_experts:
            raise SpecProblem("shards.count", f"{n} shards exceed {self.live_experts} live experts")
        for e, r in self.shards.replicas.items():
            if e >= E:
                raise SpecProblem("shards.replicas", f"expert {e} not in [0, {E})")
            if r > n:
                raise SpecProblem("shards.replicas", f"expert {e}: {r} replicas exceed {n} shards")
        pinned_removed = sorted(set(self.shards.replicas) & set(self.removed_ids))
        if pinned_removed:
            raise SpecProblem("shards.replicas", f"experts {pinned_removed[:5]} are removed")
        c = self.control
        if c.max_shards is not None and c.max_shards < c.min_shards:
            raise SpecProblem("control.max_shards", "must not be below control.min_shards")
        layer_specs = [self.layer(i) for i in range(self.num_layers)]
        if c.bias_update_rate > 0 and not any(
            getattr(s.routing, "correction_bias", False) for s in layer_specs
        ):
            raise SpecProblem(
                "control.bias_update_rate", "needs topk routing with correction_bias: true"
            )
        if any(s.routing.kind == "soft" and s.shared is not None for s in layer_specs):
            raise SpecProblem("shared", "soft routing mixes tokens into slots: no shared experts")
        if self.limits.max_batch_tokens > self.limits.max_request_tokens:
            raise SpecProblem("limits.max_batch_tokens", "must not exceed max_request_tokens")
        return self

    # --- the next spec, for each runtime change ------------------------------------------

    def with_experts_added(self, count: int, layer: int = 0) -> PoolSpec:
        """This spec with ``count`` more experts in ``layer`` (flat ids ``E .. E+count-1``,
        layer ids ``E_l .. E_l+count-1``), or a ConfigError saying why it cannot grow."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_ADD:
            raise ConfigError(f"count must be an int in [1, {MAX_ADD}], got {count!r}", "count")
        if not self.layers:
            routing = self.routing.grown(self.num_experts, count)
            experts = _replace(self.experts, num_experts=self.num_experts + count)
            return _replace(self, experts=experts, routing=routing)
        if not 0 <= layer < self.num_layers:
            raise ConfigError(f"layer {layer} is not in [0, {self.num_layers})", "layer")
        old = self.layer(layer)
        routing = old.routing.grown(old.num_experts, count)
        layers = list(self.layers)
        layers[layer] = _replace(
            layers[layer], num_experts=old.num_experts + count, routing=routing
        )
        return _replace(self, layers=tuple(layers), id_blocks=(*self.blocks, (layer, count)))

    def with_experts_removed(self, ids) -> PoolSpec:
        """This spec with flat ``ids`` removed (and unpinned); they are never routed to
        again."""
        pins = {e: r for e, r in self.shards.replicas.items() if e not in ids}
        shards = _replace(self.shards, replicas=pins)
        if not self.layers:
            removed = sorted(set(self.experts.removed) | set(ids))
            experts = _replace(self.experts, removed=tuple(removed))
            return _replace(self, experts=experts, shards=shards)
        ids = np.asarray(sorted(ids), np.int64)
        layer_of, expert_of = self.flat.layer_of[ids], self.flat.expert_of[ids]
        layers = list(self.layers)
        for i in np.unique(layer_of).tolist():
            mine = expert_of[layer_of == i].tolist()
            removed = tuple(sorted(set(layers[i].removed) | set(mine)))
            layers[i] = _replace(layers[i], removed=removed)
        return _replace(self, layers=tuple(layers), shards=shards)

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
    data = {**{k: getattr(model, k) for k in type(model).model_fields}, **changes}
    try:
        return type(model).model_validate(data)
    except pydantic.ValidationError as e:
        raise _config_error(e) from None


def _layer_spec(spec: PoolSpec, index: int, ls: LayerSpec) -> PoolSpec:
    """Layer ``index`` of a multi-layer spec, as a single-layer spec."""
    experts = {
        **{k: getattr(spec.experts, k) for k in type(spec.experts).model_fields},
        "num_experts": ls.num_experts or spec.experts.num_experts,
        "removed": ls.removed,
    }
    data = {
        "name": spec.name,
        "d_model": spec.d_model,
        "dtype": spec.dtype,
        "seed": spec.seed + index,
        "experts": experts,
        "routing": ls.routing or spec.routing,
        "shared": ls.shared or spec.shared,
        "limits": spec.limits,
    }
    try:
        return PoolSpec.model_validate(data)
    except pydantic.ValidationError as e:
        err = _config_error(e)
        message = str(err).removeprefix(f"{err.field}: ")
        raise SpecProblem(f"layers.{index}.{err.field or ''}".rstrip("."), message) from None


def _check_layers(spec: PoolSpec) -> None:
    if spec.experts.removed:
        raise SpecProblem("experts.removed", "a multi-layer spec removes experts per layer")
    sizes = [s.experts.num_experts for s in spec._layer_specs]
    if spec.id_blocks:
        got = [0] * len(sizes)
        for layer, count in spec.id_blocks:
            if layer >= len(sizes):
                raise SpecProblem("id_blocks", f"layer {layer} is not in [0, {len(sizes)})")
            got[layer] += count
        if got != sizes:
            raise SpecProblem("id_blocks", f"blocks give layers {got} experts, not {sizes}")


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
    r.check_removed(E, removed)


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
