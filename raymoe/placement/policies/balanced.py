"""``balanced`` (the default): near-optimal balance for the fewest moved replicas.

Candidates, each refined by the local search of :mod:`.search`:

1. *repair*: the current placement, repaired by :mod:`.evict` (water-filled counts with
   hysteresis; the heaviest replicas that fit under each overloaded shard's excess are
   evicted and placed again by LPT with the new ones), then searched with the moves left;
2. *fresh*: packings from scratch for a few replica totals (water-filling at each total:
   with few places per shard, spending every spare replica is not always best). Replicas
   heavier than a shard's share and every replica of a replicated expert go first, by
   LPT (the heaviest to the lightest shard that has a free place and not its expert); the
   light tail follows in vectorised rounds.

The plan with the lowest maximum shard load wins; within ``TIE`` of it, the one that moves
fewer replicas. A plan never creates more than ``budget.max_moves`` replicas at new places.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from raymoe.placement.budget import Budget, Plan, loads_of, lower_bound, shard_loads
from raymoe.placement.policies.counts import water_fill
from raymoe.placement.policies.evict import repaired
from raymoe.placement.policies.repair import Movable
from raymoe.placement.policies.search import State, kicked_search, search
from raymoe.placement.table import Placement, keys, realize

TIE = 2e-3  # relative: plans this close in balance count as equal (fewer moves wins)
AIM = 2e-4  # the search stops within this of the lower bound (relative)
REPAIR = 2e-3  # the repair stops within this of the aim; the search does the rest
SMALL = 4096  # replicas: bigger pools are repaired, not planned from scratch
MOVABLE = 1 << 15  # big pools: replicas a repair or search may move (the heaviest)
STEPS, BIG_STEPS = 2000, 64  # local-search steps per candidate (small, big pools)
KICKED, KICKS = 64, 8  # pools up to KICKED replicas: KICKS random kicks per candidate
SMALL_COUNTS, HOT = 64, 3  # pools up to SMALL_COUNTS replicas: every count of HOT experts


def balanced(load, current: Placement, budget: Budget, *, bytes_per_expert: int = 1) -> Plan:
    load = np.asarray(load, np.float64)
    N = budget.num_shards
    active = budget.active()
    mean = load.sum() / max(int(active.sum()), 1)
    top0 = float(shard_loads(load, current)[active[: current.num_shards]].max())
    unchanged = Plan(current, 0, 0, 0, *(2 * [top0 / mean if mean > 0 else 1.0]))
    forced = bool(budget.exclude) or any(
        int(current.replicas()[e]) != c for e, c in budget.pins.items()
    )
    if unchanged.imbalance_before <= budget.target and not forced:
        return unchanged  # good enough: move nothing
    counts = water_fill(load, budget)
    aim = mean * max(lower_bound(load, budget, counts), 1.0) * (1 + AIM)
    old_key = keys(current, N)
    if (np.diff(old_key) < 0).any():  # e.g. a placement saved by an older version
        old_key = np.sort(old_key)
    max_moves = np.inf if budget.max_moves is None else budget.max_moves
    best = None if forced else (top0, 0, *current.pairs())
    for e, s in _candidates(load, current, budget, aim, max_moves, old_key, counts):
        key = e * N + s
        pos = np.searchsorted(old_key, key).clip(max=max(len(old_key) - 1, 0))
        n = int((old_key[pos] != key).sum()) if len(old_key) else len(key)
        if n > max_moves or not valid(e, s, load, budget):
            continue
        top = loads_of(load, e, s, N)[active].max() if len(e) else 0.0
        if (
            best is None
            or top < best[0] * (1 - TIE)
            or (top <= best[0] * (1 + TIE) and n < best[1])
        ):
            best = (top, n, e, s)
    if best is None or (best[1] == 0 and len(best[2]) == current.num_replicas):
        return unchanged  # nothing better
    top, added, e, s = best
    dropped = current.num_replicas - (len(e) - added)
    return Plan(
        realize(current, e, s),
        added,
        dropped,
        added * bytes_per_expert,
        unchanged.imbalance_before,
        top / mean,
    )


def valid(expert, shard, load, budget: Budget) -> bool:
    """Every live expert served and every pin kept, no expert twice on a shard, the places
    and the replica budget respected, nothing on an excluded shard."""
    N = budget.num_shards
    reps = np.bincount(expert, minlength=len(load))
    want = np.ones(len(load), np.int64)  # at least this many (pins: exactly)
    pinned = np.zeros(len(load), bool)
    for e, c in budget.pins.items():
        want[e], pinned[e] = c, True
    if (reps[pinned] != want[pinned]).any() or (reps[~pinned] < 1).any():
        return False
    if budget.capacity is not None and np.bincount(shard, minlength=N).max() > budget.capacity:
        return False
    if len(expert) > max(budget.replica_limit(), int(want.sum())):
        return False
    multi = reps[expert] > 1  # only replicated experts can sit twice on a shard
    key = expert[multi] * N + shard[multi]
    return bool(budget.active()[shard].all()) and len(np.unique(key)) == len(key)


def _candidates(load, current, budget, aim, max_moves, old_key, counts):
    """Yield refined (expert, shard) pairs: the repair first, then fresh packings."""
    mean = load.sum() / max(int(budget.active().sum()), 1)
    big = current.num_replicas > SMALL
    repair_to = aim if big else aim * (1 + REPAIR)  # big pools: no search budget to finish
    slack = dataclasses.replace(budget, target=max(budget.target, repair_to / mean))
    if np.isfinite(max_moves):
        slack = dataclasses.replace(slack, max_moves=int(max_moves))
    variants = [counts]
    if np.isfinite(max_moves):  # a move budget: also spend every move on balance alone
        variants.append(np.maximum(current.replicas(), 1))
    # NOTE: eviction moves the heaviest replicas at once; on small pools the search alone
    # (limit inf: counts changed, nothing evicted) may spend a move budget better
    limits = [slack.target * mean] + ([np.inf] if not big and np.isfinite(max_moves) else [])
    for counts, limit in itertools.product(variants, limits):
        e, s = repaired(load, current, slack, counts, limit, movable=MOVABLE if big else None)
        if big and loads_of(load, e, s, budget.num_shards).max() <= aim * (1 + REPAIR):
            yield e, s  # NOTE: within the repair's slack of the aim: no search worth its time
            continue
        yield _searched(
            load, e, s, budget, aim, STEPS if not big else BIG_STEPS, max_moves, big, old_key
        )
    if big:
        return  # NOTE: big pools: the repair of the heaviest replicas is the plan
    for r, kick in _count_vectors(load, budget):
        e, s = pack(load, r, budget)
        state = State(load, e, s, budget)
        if kick and len(e) <= KICKED:
            st = kicked_search(state, target=aim, steps=STEPS, kicks=KICKS, seed=len(e))
        else:
            st = search(state, target=aim, steps=STEPS)
        yield st.expert, st.shard


def _searched(load, expert, shard, budget, aim, steps, max_moves, big: bool, old_key):
    """(expert, shard) after the local search (of the heaviest replicas, for big pools),
    ending with at most ``max_moves`` replicas away from the current placement (whose
    sorted keys are ``old_key``)."""
    N = budget.num_shards
    key = expert * N + shard
    pos = np.searchsorted(old_key, key).clip(max=max(len(old_key) - 1, 0))
    origin = np.where(old_key[pos] == key, shard, -1) if len(old_key) else np.full_like(key, -1)
    if not big:
        st = search(
            State(load, expert.copy(), shard.copy(), budget, origin=origin),
            target=aim,
            steps=steps,
            moves_left=max_moves,
        )
        return st.expert, st.shard
    items = Movable.of(load, expert, shard, N, MOVABLE)
    mine = origin[items.rows]
    outside = int((origin < 0).sum()) - int((mine < 0).sum())  # moved, and not searched
    st = search(
        State.of(load, items, budget, mine), target=aim, steps=steps, moves_left=max_moves - outside
    )
    shard = shard.copy()
    shard[items.rows] = st.shard
    return expert, shard


def _count_vectors(load, budget: Budget):
    """Replica counts to pack: water-filling at each total of :func:`_totals`; for small
    pools also every count (floor..active shards) of the ``HOT`` hottest experts, the rest
    water-filled around them or at the floor (the counts that pair well are not
    always the even ones)."""
    seen = set()
    for total in _totals(load, budget):
        r = water_fill(load, budget, total)
        seen.add(r.tobytes())
        yield r, True
    if budget.replica_limit() > SMALL_COUNTS:
        return
    A = int(budget.active().sum())
    mean = load.sum() / max(A, 1)
    hot = [
        int(e)
        for e in np.argsort(-load, kind="stable")[:HOT]
        if load[e] > mean / 4 and e not in budget.pins
    ]
    for counts in itertools.product(range(budget.floor(), A + 1), repeat=len(hot)):
        pins = {**budget.pins, **dict(zip(hot, counts, strict=True))}
        if sum(pins.values()) + len(load) - len(pins) > budget.replica_limit():
            continue
        filled = water_fill(load, dataclasses.replace(budget, pins=pins))
        single = np.full(len(load), budget.floor(), np.int64)  # the rest at the floor
        single[list(pins)] = list(pins.values())
        for r in (filled, single):
            if r.tobytes() not in seen:
                seen.add(r.tobytes())
                yield r, False


def _totals(load, budget: Budget) -> list[int]:
    """Replica totals to try: every one for small pools, else the budget's and a few less."""
    live = (len(load) - sum(1 for c in budget.pins.values() if c == 0)) * budget.floor()
    top = budget.replica_limit()
    if top - live <= 0:
        return [top]
    if top <= SMALL_COUNTS:
        return list(range(top, live - 1, -1))
    return sorted({top, live + (top - live) // 2, live + (top - live) // 4}, reverse=True)


def pack(load, r: np.ndarray, budget: Budget):
    """(expert [R], shard [R]) of ``r[e]`` replicas of each expert, packed: heavy and
    replicated ones by LPT, the light tail by rounds (see the module doc)."""
    expert = np.repeat(np.arange(len(load)), r)
    w = load[expert] / np.maximum(r[expert], 1)
    order = np.lexsort((expert, -w))  # heaviest first; an expert's replicas side by side
    expert, w = expert[order], w[order]
    A = np.flatnonzero(budget.active())
    mean = w.sum() / max(len(A), 1)
    heavy = (r[expert] > 1) | (w > mean / 64)
    head = max(int(np.flatnonzero(heavy).max()) + 1 if heavy.any() else 0, 2 * len(A))
    head = min(head, len(expert))
    shard = np.empty(len(expert), np.int64)
    sl = np.zeros(budget.num_shards)
    count = np.zeros(budget.num_shards, np.int64)
    _lpt(expert[:head], w[:head], shard[:head], A, sl, count, budget.capacity)
    _rounds(w[head:], shard[head:], A, sl, count, budget.capacity)
    return expert, shard


def _lpt(expert, w, out, A, sl, count, cap) -> None:
    """Each replica (heaviest first) to the lightest active shard with a free place that
    does not hold its expert (replicas of one expert are adjacent)."""
    cap = cap or np.iinfo(np.int64).max
    free = np.ones(len(A), bool)
    prev = -1
    for i, (e, wi) in enumerate(zip(expert.tolist(), w.tolist(), strict=True)):
        if e != prev:
            free[:] = True
            prev = e
        ok = free & (count[A] < cap)
        if not ok.any():  # every place taken: the least filled shard (capacity is soft)
            ok = free if free.any() else np.ones(len(A), bool)
        j = int(np.argmin(np.where(ok, sl[A], np.inf)))
        n = int(A[j])
        out[i] = n
        sl[n] += wi
        count[n] += 1
        free[j] = False


def _rounds(w, out, A, sl, count, cap) -> None:
    """Light single replicas, heaviest first, in rounds of one per shard with a free place:
    the heaviest of a round to the lightest of those shards."""
    cap = cap or np.iinfo(np.int64).max
    start = 0
    while start < len(w):  # NOTE: a loop over rounds, not replicas
        avail = A[count[A] < cap]
        if not len(avail):
            avail = A  # more replicas than places: the budget's limit was not kept
        part = w[start : start + len(avail)]
        n = avail[np.argsort(sl[avail], kind="stable")[: len(part)]]
        out[start : start + len(part)] = n
        sl[n] += part
        count[n] += 1
        start += len(part)
