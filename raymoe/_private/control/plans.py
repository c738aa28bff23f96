"""What each runtime operation asks for, as pure functions of the goal and the load: input
checks, the target placement (or spec), the budget policies plan within, and the report.
No Ray, no weights: the controller applies what these return.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from raymoe._private.control.goal import Goal
from raymoe._private.control.loop import live_mask
from raymoe._private.data.gates import prefix
from raymoe.config import PoolSpec
from raymoe.errors import ConfigError, DTypeError, ExpertIdError
from raymoe.layer import check_layer
from raymoe.placement import (
    Budget,
    Change,
    Placement,
    Plan,
    bias_step,
    imbalance,
    realize,
    shard_loads,
)
from raymoe.placement.layered import layer_imbalances, plan_layers
from raymoe.reports import OpReport, PoolDescription, PoolStats


def check_expert(spec: PoolSpec, expert: int) -> None:
    """``expert`` (a flat id) exists and was not removed."""
    if not 0 <= expert < spec.num_experts:
        raise ExpertIdError(f"expert {expert} is not in [0, {spec.num_experts})")
    if expert in spec.removed_ids:
        raise ExpertIdError(f"expert {expert} was removed from the pool")


def flat_ids(spec: PoolSpec, layer: int, experts) -> np.ndarray:
    """The flat ids of ``layer``'s ``experts`` (layer ids), each checked: a
    :class:`LayerIndexError` or :class:`ExpertIdError` naming the problem."""
    check_layer(spec, layer)
    a = np.asarray(experts)
    if a.size and a.dtype.kind not in "iu":
        raise DTypeError(f"expert ids must be integers, got {a.dtype}")
    a = a.reshape(-1).astype(np.int64)
    own = spec.layer(layer)
    for e in a.tolist():
        if not 0 <= e < own.num_experts:
            where = f" of layer {layer}" if spec.multi_layer else ""
            raise ExpertIdError(f"expert {e} is not in [0, {own.num_experts}){where}")
        if e in own.experts.removed:
            raise ExpertIdError(f"expert {e} was removed from the pool")
    return spec.flat.flat(layer, a) if spec.multi_layer else a


def layer_ids(spec: PoolSpec, layer: int, flat) -> tuple[int, ...]:
    """Layer ids of flat ids ``flat`` (all of ``layer``)."""
    if not spec.multi_layer:
        return tuple(int(e) for e in flat)
    return tuple(int(e) for e in spec.flat.expert_of[np.asarray(flat, np.int64)])


def layer_pins(spec: PoolSpec, layer: int) -> dict[int, int]:
    """``layer``'s pins by layer ids."""
    if not spec.multi_layer:
        return spec.pins
    flat = spec.flat
    return {int(flat.expert_of[e]): r for e, r in spec.pins.items() if flat.layer_of[e] == layer}


def groups(spec: PoolSpec) -> list[np.ndarray]:
    """Each layer's flat ids."""
    return [spec.flat.ids(i) for i in range(spec.num_layers)]


def plan(policy, goal: Goal, load: np.ndarray, bytes_per_expert: int) -> Plan:
    """``policy``'s plan for the pool: once per layer of a multi-layer pool."""
    b = budget(goal)
    if not goal.spec.multi_layer:
        return policy(load, goal.placement, b, bytes_per_expert=bytes_per_expert)
    return plan_layers(
        policy, load, goal.placement, b, groups(goal.spec), bytes_per_expert=bytes_per_expert
    )


def active(goal: Goal) -> np.ndarray:
    """[N] bool: the shards that are not drained."""
    mask = np.ones(goal.placement.num_shards, bool)
    mask[[n for n in goal.drained if n < len(mask)]] = False
    return mask


def pool_imbalance(goal: Goal, load: np.ndarray, placement: Placement | None = None) -> float:
    """max / mean shard load of ``placement`` (default: the goal's) over active shards."""
    p = placement or goal.placement
    if goal.spec.multi_layer:
        return max(layer_imbalances(load, p, groups(goal.spec), active(goal)))
    return imbalance(shard_loads(load, p)[active(goal)[: p.num_shards]])


def budget(goal: Goal, num_shards: int | None = None) -> Budget:
    """What a plan may use: the pool's shards, E + extra replicas (enough for every pin),
    ``control.capacity`` places a shard, the pins, the drained shards, and the target
    (``plan_margin`` of the way to ``target_imbalance``)."""
    spec, c = goal.spec, goal.spec.control
    floor = spec.shards.min_replicas
    E = spec.live_experts * floor
    pins = spec.pins
    extra = max(
        num_shards or goal.placement.num_shards,
        int(c.extra_replicas * E),
        sum(pins.values()) - len(pins),
    )
    zero = {e: 0 for e in spec.removed_ids}  # removed: no replica
    target = 1.0 + c.plan_margin * (c.target_imbalance - 1.0)
    return Budget(
        num_shards or goal.placement.num_shards,
        E + extra,
        c.capacity,
        {**zero, **pins},
        target,
        frozenset(goal.drained),
        min_replicas=floor,
    )


def replicated(goal: Goal, load: np.ndarray, expert: int, replicas: int) -> Placement | None:
    """The next placement with ``expert`` on exactly ``replicas`` shards (more on the least
    loaded active shards, fewer by dropping from the most loaded); None if it already is."""
    check_expert(goal.spec, expert)
    on = active(goal)
    if not 1 <= replicas <= int(on.sum()):
        raise ConfigError(
            f"replicas must be in [1, {int(on.sum())}] (active shards), got {replicas}", "replicas"
        )
    p = goal.placement
    e, s = p.pairs()
    mine = e == expert
    have = s[mine].tolist()
    if len(have) == replicas:
        return None
    spec = goal.spec
    if spec.multi_layer:  # balance is per layer: the expert's layer's load decides
        load = np.where(spec.flat.layer_of == spec.flat.layer_of[expert], load, 0.0)
    loads = shard_loads(load, p)
    by_load = [n for n in np.argsort(loads, kind="stable").tolist() if on[n]]
    if len(have) < replicas:
        add = [n for n in by_load if n not in have][: replicas - len(have)]
        e = np.concatenate([e, np.full(len(add), expert)])
        s = np.concatenate([s, np.asarray(add, np.int64)])
    else:
        drop = sorted(have, key=lambda n: -loads[n])[: len(have) - replicas]
        keep = ~(mine & np.isin(s, drop))
        e, s = e[keep], s[keep]
    return realize(p, e, s)


def removed(goal: Goal, ids) -> tuple[PoolSpec, Placement, list[int]]:
    """(spec, placement, the ids) with experts ``ids`` removed: never routed to again, no
    replica."""
    a = np.asarray(ids)
    if a.size and a.dtype.kind not in "iu":
        raise DTypeError(f"expert ids must be integers, got {a.dtype}")
    ids = sorted({int(e) for e in a.reshape(-1).tolist()})
    if not ids:
        raise ConfigError("remove_experts needs at least one expert id", "ids")
    for e in ids:
        check_expert(goal.spec, e)
    spec = goal.spec.with_experts_removed(ids)  # the spec's checks: kind, experts left, ...
    p = goal.placement
    e, s = p.pairs()
    keep = ~np.isin(e, ids)
    return spec, realize(p, e[keep], s[keep]), ids


def scale_bounds(goal: Goal, count: int, max_shards: int | None) -> None:
    live = goal.spec.live_experts
    top = min(max_shards or live, live)
    if not 1 <= count <= top:
        raise ConfigError(f"shards must be in [1, {top}], got {count}", "shards")


def drain_bounds(goal: Goal, shard: int) -> None:
    N = goal.placement.num_shards
    if not 0 <= shard < N:
        raise ConfigError(f"shard must be in [0, {N}), got {shard}", "shard")
    if len(goal.drained | {shard}) >= N:
        raise ConfigError("cannot drain the last active shard", "shard")


def report(
    goal: Goal,
    load: np.ndarray,
    change: Change,
    new: Placement,
    bytes_per_expert: int,
    before: float,
    **extra,
) -> OpReport:
    """The report of ``change``, which made ``new`` (the goal holds it by now)."""
    return OpReport(
        version=new.version,
        replicas_added=change.replicas_added,
        replicas_dropped=change.replicas_dropped,
        bytes_moved=change.replicas_added * bytes_per_expert,
        imbalance_before=before,
        imbalance_after=pool_imbalance(goal, load),
        **extra,
    )


def planned(plan: Plan, current: Placement, dry_run: bool, policy: str) -> OpReport:
    """The report of a policy's plan (the version it would publish, or the current one
    when it changes nothing or is a dry run)."""
    changed = plan.replicas_added or plan.replicas_dropped
    return OpReport(
        version=plan.placement.version if changed and not dry_run else current.version,
        replicas_added=plan.replicas_added,
        replicas_dropped=plan.replicas_dropped,
        bytes_moved=plan.bytes_moved,
        imbalance_before=plan.imbalance_before,
        imbalance_after=plan.imbalance_after,
        dry_run=dry_run,
        policy=policy,
    )


def unchanged(goal: Goal, load: np.ndarray, **extra) -> OpReport:
    imb = pool_imbalance(goal, load)
    return OpReport(
        version=goal.placement.version, imbalance_before=imb, imbalance_after=imb, **extra
    )


def description(
    goal: Goal, routers: int, degraded: list[str], last_change: dict, resumed_changes: int
) -> PoolDescription:
    """The pool as :meth:`PoolHandle.describe` reports it."""
    p, spec = goal.placement, goal.spec
    return PoolDescription(
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        placement_version=p.version,
        routing_version=goal.routing_version,
        shards=p.num_shards,
        routers=routers,
        experts=p.num_experts,
        live_experts=spec.live_experts,
        replicas=p.num_replicas,
        experts_per_shard=tuple(p.held().tolist()),
        removed=spec.removed_ids,
        pinned=spec.pins,
        drained=tuple(sorted(goal.drained)),
        degraded=tuple(degraded),
        last_change_s=dict(last_change),
        resumed_changes=resumed_changes,
        layers=spec.num_layers,
        live_per_layer=tuple(s.experts.live for s in map(spec.layer, range(spec.num_layers))),
    )


def bias_stepped(spec: PoolSpec, gate: dict, counts: np.ndarray) -> dict:
    """``gate`` after one aux-loss-free step: each layer's selection bias (where it has one)
    moves towards balance for the pairs ``counts`` ([E], flat ids)."""
    live = live_mask(len(counts), spec.removed_ids)
    for i, ids in enumerate(groups(spec)):
        key = prefix(spec, i) + "router.correction_bias"
        if key in gate:
            bias = np.asarray(gate[key], np.float32)
            rate = spec.control.bias_update_rate
            gate[key] = bias_step(bias, counts[ids], rate, live[ids]).astype(np.float32)
    return gate


def first_replicas(spec: PoolSpec, p: Placement) -> list[np.ndarray]:
    """Per shard, the live experts whose first replica it holds (each live expert once)."""
    first, _ = p.primary()
    live = np.setdiff1d(np.arange(p.num_experts), np.asarray(spec.removed_ids, np.int64))
    return [live[first[live] == n] for n in range(p.num_shards)]


def per_layer(spec: PoolSpec, stats: PoolStats, p: Placement) -> PoolStats:
    """``stats`` with each layer's imbalance, and the pool's as the worst layer's (for a
    multi-layer pool; a single-layer pool's stats as they are)."""
    if not spec.multi_layer:
        return stats
    held = p.held() > 0
    imb = tuple(layer_imbalances(stats.expert_load, p, groups(spec), held))
    return dataclasses.replace(stats, imbalance=max(imb), layer_imbalance=imb)
