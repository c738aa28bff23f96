"""Placement for multi-layer pools: every layer balanced on its own, on shards they share.

A model runs its layers one after another, and each layer's step waits for its slowest shard,
so balance is per layer (as in DeepSeek's EPLB): a layer's imbalance is max / mean of what
its replicas put on each shard, and a pool's is its worst layer's. A plan runs the policy
once per layer, on that layer's experts (``groups[l]``: their flat ids) with a share of the
budget, then makes one placement of all the layers' pairs (places are the shards' own,
shared by the layers).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from raymoe.placement.budget import Budget, Plan, imbalance, shard_loads
from raymoe.placement.table import Placement, _build, diff, initial, realize


def subset(p: Placement, ids: np.ndarray) -> Placement:
    """The placement of experts ``ids`` alone (renumbered ``0 .. len(ids)-1``; shards and
    places kept)."""
    reps = p.replicas()[ids]
    ptr = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(reps, out=ptr[1:])
    rows = np.repeat(p.ptr[ids] - ptr[:-1], reps) + np.arange(int(ptr[-1]))
    return Placement(p.version, p.num_shards, ptr, p.shard[rows], p.local[rows])


def layer_imbalances(
    load: np.ndarray, p: Placement, groups: list[np.ndarray], active: np.ndarray
) -> list[float]:
    """Each layer's max / mean shard load over the ``active`` shards."""
    load = np.asarray(load, np.float64)
    on = active[: p.num_shards]
    return [imbalance(shard_loads(load[g], subset(p, g))[on]) for g in groups]


def initial_layers(
    groups: list[np.ndarray],
    num_shards: int,
    aligns: list[int],
    replicas: dict[int, int],
    removed,
) -> Placement:
    """A new multi-layer pool's placement: each layer in contiguous blocks over all the
    shards (its ``align``), the pins' extra replicas on the following shards, no replica
    for ``removed`` flat ids."""
    E = sum(len(g) for g in groups)
    removed = set(removed)
    experts, shards = [], []
    for g, align in zip(groups, aligns, strict=True):
        gone = [i for i, e in enumerate(g.tolist()) if e in removed]
        pins = {i: replicas[e] for i, e in enumerate(g.tolist()) if e in replicas}
        sub = initial(len(g), num_shards, align=align, replicas=pins, removed=gone)
        e, s = sub.pairs()
        experts.append(g[e])
        shards.append(s)
    none = np.zeros(0, np.int64)
    empty = Placement(0, num_shards, np.zeros(E + 1, np.int64), none, none)
    return _build(empty, np.concatenate(experts), np.concatenate(shards), version=1)


def plan_layers(
    policy, load, current: Placement, budget: Budget, groups: list[np.ndarray], **kwargs
) -> Plan:
    """``policy`` run on every layer (each with its share of ``budget``), as one plan."""
    load = np.asarray(load, np.float64)
    E = sum(len(g) for g in groups)
    experts, shards = [], []
    for g in groups:
        sub = subset(current, g)
        plan = policy(load[g], sub, _share(budget, g, E), **kwargs)
        e, s = plan.placement.pairs()
        experts.append(g[e])
        shards.append(s)
    e, s = np.concatenate(experts), np.concatenate(shards)
    order = np.lexsort((s, e))
    target = realize(current, e[order], s[order])
    change = diff(current, target)
    if not (change.replicas_added or change.replicas_dropped):
        target = current
    active = budget.active()
    bytes_per_expert = kwargs.get("bytes_per_expert", 1)
    return Plan(
        target,
        change.replicas_added,
        change.replicas_dropped,
        change.replicas_added * bytes_per_expert,
        max(layer_imbalances(load, current, groups, active)),
        max(layer_imbalances(load, target, groups, active)),
    )


def _share(budget: Budget, g: np.ndarray, total: int) -> Budget:
    """Layer ``g``'s part of ``budget``: its pins (renumbered), and replicas and places in
    proportion to its experts."""
    index = {int(e): i for i, e in enumerate(g.tolist())}
    pins = {index[e]: c for e, c in budget.pins.items() if e in index}
    live = len(g) - sum(1 for c in pins.values() if c == 0)
    extra = budget.max_replicas - (total - sum(1 for c in budget.pins.values() if c == 0))
    mine = max(math.ceil(extra * len(g) / max(total, 1)), sum(pins.values()) - len(pins), 0)
    capacity = budget.capacity
    if capacity is not None:
        capacity = max(1, math.ceil(capacity * len(g) / max(total, 1)))
    return dataclasses.replace(budget, max_replicas=live + mine, capacity=capacity, pins=pins)
