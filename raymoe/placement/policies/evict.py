"""``balanced``'s repair of the current placement: evict, then place by LPT.

1. Counts: water-filling over the whole replica budget, keeping surplus replicas within a
   factor of two (hysteresis); surplus beyond that is dropped from the most loaded shards.
2. Evict: from every shard over ``limit``, its heaviest replicas that fit under its excess,
   and, if that leaves it over, the lightest one that covers the rest; every replica of a
   drained shard.
3. Place the evicted replicas and the new ones by LPT: heaviest first, each to the least
   loaded active shard with a free place that does not hold its expert.

Moves are few (only evicted and new replicas go anywhere) and the balance is LPT's on what
moved. Only the ``movable`` heaviest replicas take part in 2-3 on big pools.
"""

from __future__ import annotations

import numpy as np

from raymoe.placement.budget import Budget
from raymoe.placement.policies import repair
from raymoe.placement.policies.repair import Movable
from raymoe.placement.table import Placement


def repaired(
    load,
    current: Placement,
    budget: Budget,
    counts: np.ndarray,
    limit: float,
    movable: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(expert [R], shard [R]) of ``current`` repaired towards ``counts`` (steps 1-3),
    creating at most ``budget.max_moves`` replicas at new places."""
    N = budget.num_shards
    expert, shard = current.pairs()
    have = np.bincount(expert, minlength=len(load))
    want = repair.kept_counts(load, counts, have, budget)
    if budget.max_moves is not None and np.maximum(want - have, 0).sum() > budget.max_moves:
        want = repair.kept_counts(load, np.maximum(have, 1), have, budget)  # counts stay
    expert, shard = repair.drop(load, expert, shard, want, N)
    have = np.bincount(expert, minlength=len(load))
    new = np.repeat(np.arange(len(load)), np.maximum(want - have, 0))
    expert = np.concatenate([expert, new])
    shard = np.concatenate([shard, np.full(len(new), -1, np.int64)])  # -1: to place
    items = Movable.of(load, expert, np.where(shard < 0, 0, shard), N, _limit(movable, shard))
    items.shard = shard[items.rows]
    items.base_count[:] = np.bincount(shard[_fixed(items, shard)], minlength=N)
    moves = None if budget.max_moves is None else budget.max_moves - len(new)
    _evict(items, budget, limit, moves)
    _place(items, budget)
    shard = shard.copy()
    shard[items.rows] = items.shard
    return expert, shard


def _limit(movable: int | None, shard: np.ndarray) -> int | None:
    """The movable heaviest, and at least every replica still to place."""
    if movable is None:
        return None
    return max(movable, int((shard < 0).sum()))


def _fixed(items: Movable, shard: np.ndarray) -> np.ndarray:
    keep = np.ones(len(shard), bool)
    keep[items.rows] = False
    return keep


def _evict(items: Movable, budget: Budget, limit: float, moves: int | None) -> None:
    """Set to -1 the shard of every replica to move (step 2, in place); with ``moves``, at
    most that many beyond a drained shard's (the heaviest, which help most)."""
    active = budget.active()
    shard = items.shard
    shard[(shard >= 0) & ~active[np.maximum(shard, 0)]] = -1  # a drained shard empties
    chosen: list[int] = []
    placed = shard >= 0
    sl = items.base + np.bincount(
        shard[placed], weights=items.w[placed], minlength=budget.num_shards
    )
    # NOTE: a replica of an expert on every active shard could only come back where it was
    everywhere = items.reps >= int(active.sum())
    for n in np.flatnonzero(active & (sl > limit)).tolist():  # NOTE: a loop over shards
        mine = np.flatnonzero(shard == n)
        mine = mine[~everywhere[items.expert[mine]]]
        mine = mine[np.argsort(-items.w[mine], kind="stable")]
        left = sl[n] - limit
        out = []
        for i, wi in zip(mine.tolist(), items.w[mine].tolist(), strict=True):
            if wi <= left:
                out.append(i)
                left -= wi
        if left > 1e-12 * limit:  # still over: the lightest replica that covers the rest
            rest = np.setdiff1d(mine, out)
            bigger = rest[items.w[rest] >= left]
            if len(bigger):
                out.append(int(bigger[np.argmin(items.w[bigger])]))
        chosen += out
    chosen_ = np.asarray(chosen, np.int64)
    if moves is not None and len(chosen_) > max(moves, 0):
        chosen_ = chosen_[np.argsort(-items.w[chosen_], kind="stable")[: max(moves, 0)]]
    shard[chosen_] = -1


def _place(items: Movable, budget: Budget) -> None:
    """Give every replica with shard -1 one, by LPT (step 3, in place)."""
    todo = np.flatnonzero(items.shard < 0)
    if not len(todo):
        return
    N = budget.num_shards
    placed = items.shard >= 0
    sl = items.base + np.bincount(items.shard[placed], weights=items.w[placed], minlength=N)
    count = items.base_count + np.bincount(items.shard[placed], minlength=N)
    cap = budget.capacity or np.iinfo(np.int64).max
    todo = _place_everywhere(items, todo, budget, sl, count)
    allowed = np.where(budget.active(), 0.0, np.inf)
    holders = _holders(items, todo)
    todo = todo[np.lexsort((items.expert[todo], -items.w[todo]))]
    for i in todo.tolist():  # NOTE: a loop over the replicas that move, not all of them
        e = int(items.expert[i])
        score = sl + allowed + np.where(count < cap, 0.0, np.inf)
        taken = holders.get(e)
        if taken:
            score[list(taken)] = np.inf
        n = int(np.argmin(score))
        if not np.isfinite(score[n]):  # no free place left: the least filled active shard
            n = int(np.argmin(count + np.where(budget.active(), 0, 1 << 62)))
        items.shard[i] = n
        sl[n] += items.w[i]
        count[n] += 1
        if taken is not None:
            taken.add(n)


def _place_everywhere(items: Movable, todo, budget: Budget, sl, count) -> np.ndarray:
    """Place the replicas of experts that end up on every active shard (they can go only
    to the shards without one: no choice to make); -> the replicas left to place."""
    active = np.flatnonzero(budget.active())
    full = items.reps[items.expert[todo]] >= len(active)
    if budget.capacity is not None or not full.any():
        return todo
    rows = todo[full]
    experts = np.unique(items.expert[rows])
    placed = np.flatnonzero(np.isin(items.expert, experts) & (items.shard >= 0))
    N = budget.num_shards
    missing = np.ones((len(experts), N), bool)  # [x, N]: shards still without the expert
    missing[:, ~budget.active()] = False
    missing[np.searchsorted(experts, items.expert[placed]), items.shard[placed]] = False
    order = rows[np.argsort(items.expert[rows], kind="stable")]
    _, n = np.nonzero(missing)  # row-major: by expert, then shard, like ``order``
    items.shard[order] = n
    np.add.at(sl, n, items.w[order])
    np.add.at(count, n, 1)
    return todo[~full]


def _holders(items: Movable, todo: np.ndarray) -> dict[int, set[int]]:
    """Shards already holding each replicated expert among ``todo`` (placed replicas)."""
    multi = np.unique(items.expert[todo][items.reps[items.expert[todo]] > 1])
    out: dict[int, set[int]] = {int(e): set() for e in multi.tolist()}
    if not out:
        return out
    rows = np.flatnonzero(np.isin(items.expert, multi) & (items.shard >= 0))
    for e, n in zip(items.expert[rows].tolist(), items.shard[rows].tolist(), strict=True):
        out[e].add(n)
    return out
