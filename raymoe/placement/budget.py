"""What a placement policy may use (:class:`Budget`), what it answers (:class:`Plan`), and
the measures both are judged by: shard loads, imbalance and its lower bound."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raymoe.placement.table import Placement, diff


@dataclass(frozen=True)
class Budget:
    """What a policy may use.

    num_shards:   N, every shard of the pool (``exclude``d ones end up holding nothing)
    max_replicas: replicas in all (>= the live experts)
    capacity:     places a shard may fill (None: unbounded)
    pins:         expert -> exact replica count (an operator's pin; 0 for a removed expert)
    target:       imbalance that is good enough: a policy may stop moving replicas there
    exclude:      shards being drained
    max_moves:    replicas a plan may create at new places (None: no limit)
    min_replicas: replicas every expert not pinned keeps at least (failure domains)
    """

    num_shards: int
    max_replicas: int
    capacity: int | None = None
    pins: dict[int, int] = field(default_factory=dict)
    target: float = 1.0
    exclude: frozenset[int] = frozenset()
    max_moves: int | None = None
    min_replicas: int = 1

    def active(self) -> np.ndarray:
        """[N] bool: the shards that may hold replicas."""
        mask = np.ones(self.num_shards, bool)
        mask[list(self.exclude)] = False
        return mask

    def floor(self) -> int:
        """The fewest replicas an expert not pinned may have: ``min_replicas``, at most
        one per active shard."""
        return max(1, min(self.min_replicas, int(self.active().sum())))

    def replica_limit(self) -> int:
        """Replicas a plan may hold in all: ``max_replicas``, and no more than the places."""
        if self.capacity is None:
            return self.max_replicas
        return min(self.max_replicas, self.capacity * int(self.active().sum()))


@dataclass(frozen=True)
class Plan:
    """A policy's answer: the placement to move to, and what moving there costs."""

    placement: Placement
    replicas_added: int  # copies of weights to make (each one expert's bytes)
    replicas_dropped: int
    bytes_moved: int
    imbalance_before: float
    imbalance_after: float

    @classmethod
    def between(
        cls, load, current: Placement, placement: Placement, budget: Budget, bytes_per_expert: int
    ) -> Plan:
        change = diff(current, placement)
        active = budget.active()
        return cls(
            placement,
            change.replicas_added,
            change.replicas_dropped,
            change.replicas_added * bytes_per_expert,
            imbalance(shard_loads(load, current)[active[: current.num_shards]]),
            imbalance(shard_loads(load, placement)[active]),
        )

    @classmethod
    def unchanged(cls, load, current: Placement, budget: Budget) -> Plan:
        """The plan that keeps ``current``."""
        imb = imbalance(shard_loads(load, current)[budget.active()[: current.num_shards]])
        return cls(current, 0, 0, 0, imb, imb)


def carried(load: np.ndarray, expert: np.ndarray) -> np.ndarray:
    """[R] what each replica of ``expert`` ([R]) carries: its expert's load / its replicas."""
    reps = np.bincount(expert, minlength=len(load))
    return load[expert] / reps[expert]


def loads_of(load: np.ndarray, expert: np.ndarray, shard: np.ndarray, n: int) -> np.ndarray:
    """[n] shard loads of the (expert, shard) pairs given."""
    return np.bincount(shard, weights=carried(load, expert), minlength=n)


def shard_loads(load: np.ndarray, p: Placement) -> np.ndarray:
    """[N] the load each shard of ``p`` carries."""
    load = np.asarray(load, np.float64)
    if len(load) == p.num_experts == p.num_replicas and p.one_place_each:
        # NOTE: the controller's every step at 1M experts: 15 -> 3 ms
        return np.bincount(p.shard, weights=load, minlength=p.num_shards)
    return loads_of(load, *p.pairs(), p.num_shards)


def imbalance(shard_load: np.ndarray) -> float:
    """max / mean of the shard loads given (1.0 for no load)."""
    mean = shard_load.mean() if len(shard_load) else 0.0
    return float(shard_load.max() / mean) if mean > 0 else 1.0


def lower_bound(load: np.ndarray, budget: Budget, counts: np.ndarray | None = None) -> float:
    """The smallest imbalance any placement within ``budget`` can reach, as max(mean,
    the least possible heaviest replica) / mean: a bound, not always reachable.
    ``counts``: the water-filled replica counts, when the caller has them."""
    from raymoe.placement.policies.counts import water_fill

    load = np.asarray(load, np.float64)
    mean = load.sum() / max(int(budget.active().sum()), 1)
    if mean <= 0:
        return 1.0
    r = water_fill(load, budget) if counts is None else counts
    heaviest = float((load / np.maximum(r, 1)).max()) if len(load) else 0.0
    return max(mean, heaviest) / mean
