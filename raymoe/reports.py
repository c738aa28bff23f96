"""What a pool reports: typed, frozen values shared by the controller, the handle, the SDK and
the CLI. :meth:`to_dict` gives plain JSON-able data (``raymoe ... -o json``); protobuf
conversion lives in one module (``raymoe._private.data.wire``).

- :class:`OpReport`: the answer of every runtime operation (rebalance, replicate, pin,
  unpin, drain, scale, add and remove experts);
- :class:`PoolStats`: traffic over a window ending now;
- :class:`PoolDescription`: the pool's layout and state;
- :class:`ForwardInfo`: what a forward pass says beside its output (``return_info=True``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Report:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ForwardInfo(_Report):
    """Beside a forward pass's output: ``degraded_tokens``, the rows served without some of
    their experts (``faults.on_unreachable: degrade`` and every replica of those experts
    unreachable; their remaining weights were renormalised), 0 for a full answer; and
    ``direct``, whether the caller sent it straight to the shards (a small request,
    ``limits.direct_max_tokens``) rather than through a router."""

    degraded_tokens: int = 0
    direct: bool = False


@dataclass(frozen=True)
class OpReport(_Report):
    """A runtime operation's outcome: the placement version it published (the current one
    when nothing changed), replicas added (weights copied) and dropped, the bytes copied, and
    the imbalance (max / mean shard load of the load window) before and after."""

    version: int
    replicas_added: int = 0
    replicas_dropped: int = 0
    bytes_moved: int = 0
    imbalance_before: float = 1.0
    imbalance_after: float = 1.0
    dry_run: bool = False
    policy: str = ""
    expert_ids: tuple[int, ...] = ()  # add_experts: the new ids
    removed: tuple[int, ...] = ()  # remove_experts: the ids removed
    pinned: dict[int, int] = field(default_factory=dict)  # pin/unpin: the pins after it
    layer: int = 0  # the layer the ids above belong to (multi-layer pools)

    @property
    def changed(self) -> bool:
        return bool(self.replicas_added or self.replicas_dropped)


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class PoolStats(_Report):
    """Traffic over the last ``window_s`` seconds (ending now), merged over the routers.

    pairs_per_shard: (token, expert) pairs sent to each shard in the window
    imbalance:       max / mean of ``pairs_per_shard`` over the shards holding experts
                     (multi-layer pools: the worst of ``layer_imbalance``, each layer's
                     max / mean shard load: a layer's step waits for its slowest shard)
    expert_load:     [E] pairs routed to each expert in the window
    counters:        totals since the routers started (batches, retries, rejected, ...)
    load_map:        [N, B] the window's pairs per (shard, bin of experts), when asked for
                     (``load_bins``); bin ``b`` holds the experts ``e`` with ``e * B // E ==
                     b`` (``B = min(load_bins, E)``). Attributed by the current placement: a
                     replicated expert's pairs split evenly over its replicas, as the routers
                     deal them in turn
    """

    window_s: float
    requests: int
    tokens: int
    tokens_per_s: float
    latency: Latency | None
    batch_tokens_mean: float | None
    batch_tokens_max: int | None
    pairs_per_shard: tuple[int, ...]
    imbalance: float
    expert_load: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)
    load_map: np.ndarray | None = None
    layer_imbalance: tuple[float, ...] = ()  # multi-layer pools: each layer's imbalance


@dataclass(frozen=True)
class PoolDescription(_Report):
    """A pool's layout and state. ``spec`` is the current spec as JSON-able data (it changes
    with runtime operations); ``pinned`` the operator's replica targets; ``last_change_s``
    the seconds of each stage of the last placement change (copy, publish, drain, free)."""

    name: str
    spec: dict
    placement_version: int
    routing_version: int
    shards: int
    routers: int
    experts: int
    live_experts: int
    replicas: int
    experts_per_shard: tuple[int, ...]
    removed: tuple[int, ...] = ()
    pinned: dict[int, int] = field(default_factory=dict)
    drained: tuple[int, ...] = ()
    degraded: tuple[str, ...] = ()
    last_change_s: dict[str, float] = field(default_factory=dict)
    resumed_changes: int = 0  # placement changes a restarted controller finished
    layers: int = 1  # MoE layers (multi-layer pools: expert ids above are flat ids)
    live_per_layer: tuple[int, ...] = ()  # live experts of each layer
