"""``incremental``: repair the current placement until imbalance <= ``budget.target``,
moving as few replicas as it can.

1. Replica counts: pins exactly; an expert whose load per replica would not fit in one
   shard's share gets more replicas (within the budget, hottest first); replicas beyond
   what an expert needs are dropped (the cooled-down ones) from the most loaded shards.
2. Rounds of moves: every overloaded shard sends its heaviest replicas that fit under its
   excess to the shards with the most room.
3. Still over the target with replicas to spare: split the heaviest replica of the hottest
   shard onto the coldest shard without it, and move again.

It stops at the target, which is greedy's answer on small skewed pools; ``balanced``
(the default) goes further.
"""

from __future__ import annotations

import numpy as np

from raymoe.placement.budget import Budget, Plan, loads_of
from raymoe.placement.policies import repair
from raymoe.placement.policies.eplb import eplb
from raymoe.placement.table import Placement, realize


def incremental(
    load, current: Placement, budget: Budget, *, bytes_per_expert: int = 1, max_rounds: int = 64
) -> Plan:
    load = np.asarray(load, np.float64)
    E = len(load)
    expert, shard = repair_pairs(load, current, budget, max_rounds)
    plan = Plan.between(load, current, realize(current, expert, shard), budget, bytes_per_expert)
    forced = budget.exclude or any(int(current.replicas()[e]) != c for e, c in budget.pins.items())
    nothing = not (plan.replicas_added or plan.replicas_dropped)
    if nothing or (plan.imbalance_after > plan.imbalance_before and not forced):
        return Plan.unchanged(load, current, budget)
    if plan.replicas_added > E // 4:
        # NOTE: a repair this big may cost more than planning from scratch (small pools
        # under heavy skew): then take whichever plan balances better, or moves less
        fresh = eplb(load, current, budget, bytes_per_expert=bytes_per_expert)
        if _better(fresh, plan, budget.target):
            return fresh
    return plan


def repair_pairs(load, current: Placement, budget: Budget, max_rounds: int = 64):
    """The (expert, shard) pairs of the repaired placement (steps 1-3 of the module doc)."""
    N = budget.num_shards
    expert, shard = current.pairs()
    have = np.bincount(expert, minlength=len(load))
    active = budget.active()
    mean = load.sum() / active.sum()
    limit = np.where(active, budget.target * mean, 0.0)  # [N]; drained shards must empty
    want = repair.wanted_counts(load, have, budget, budget.target * mean)
    expert, shard = repair.drop(load, expert, shard, want, N)
    expert, shard = repair.add(load, expert, shard, want, budget)
    shard = repair.evacuate(load, expert, shard, budget)
    shard = _moved(load, expert, shard, budget, limit, max_rounds)
    for _ in range(max_rounds):
        spare = budget.replica_limit() - len(expert)
        sl = loads_of(load, expert, shard, N)
        if spare <= 0 or (sl <= limit + 1e-9).all():
            break
        grown = repair.split_hottest(load, expert, shard, sl, budget)
        if grown is None:
            break
        expert, shard = grown
        shard = _moved(load, expert, shard, budget, limit, max_rounds)
    return expert, shard


def _moved(load, expert, shard, budget, limit, max_rounds) -> np.ndarray:
    """``shard`` after rounds of moves."""
    items = repair.Movable.of(load, expert, shard, budget.num_shards)
    repair.moves(items, budget, limit, max_rounds)
    return items.shard


def _better(a: Plan, b: Plan, target: float) -> bool:
    """Whether plan ``a`` beats ``b``: meeting the target first, then fewer bytes, then
    a lower imbalance."""
    ok_a, ok_b = a.imbalance_after <= target, b.imbalance_after <= target
    if ok_a != ok_b:
        return ok_a
    if ok_a:
        return a.bytes_moved < b.bytes_moved
    return (a.imbalance_after, a.bytes_moved) < (b.imbalance_after, b.bytes_moved)
