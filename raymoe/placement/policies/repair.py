"""Repairs of an existing placement, as flat (expert [R], shard [R]) arrays: replica counts
with hysteresis, drops, additions, evacuation of drained shards, and rounds of moves from
overloaded shards. Shared by ``incremental`` and ``balanced``; vectorised with numpy (loops
run over rounds, never over experts)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.placement.budget import Budget, carried, loads_of


def wanted_counts(load, have, budget: Budget, limit: float) -> np.ndarray:
    """[E] replicas each expert should have: only an expert too hot for one shard's
    ``limit`` gets more; the rest as :func:`kept_counts`."""
    N = int(budget.active().sum())
    need = np.clip(np.ceil(load / max(limit, 1e-12)), budget.floor(), N).astype(np.int64)
    return kept_counts(load, need, have, budget)


def kept_counts(load, want, have, budget: Budget) -> np.ndarray:
    """``want`` with hysteresis against the replicas experts ``have``: a count within a
    factor of two of the wanted one is kept. Pins exactly; trimmed to the budget (least
    loaded per replica first, never below the floor or a pin)."""
    E, N = len(load), int(budget.active().sum())
    floor = budget.floor()
    want = np.maximum(want, floor)
    keep = (have > want) & (have <= 2 * want)  # NOTE: only surplus is kept, never refused
    want = np.where(keep, np.minimum(have, N), want)
    pinned = np.zeros(E, bool)
    for e, c in budget.pins.items():
        want[e], pinned[e] = c, True
    over = int(want.sum()) - budget.replica_limit()
    if over > 0:
        extra = np.where(pinned, 0, want - floor)
        order = np.argsort(load / np.maximum(want, 1), kind="stable")
        order = order[extra[order] > 0]
        done = np.cumsum(extra[order]) - extra[order]
        want[order] -= np.minimum(extra[order], np.maximum(over - done, 0))
    return want


def drop(load, expert, shard, want, N):
    """Remove replicas beyond ``want``, taking them off the most loaded shards first."""
    have = np.bincount(expert, minlength=len(load))
    if not (have > want).any():
        return expert, shard
    sl = loads_of(load, expert, shard, N)
    order = np.lexsort((sl[shard], expert))  # per expert, least loaded shards first (kept)
    expert, shard = expert[order], shard[order]
    rank = np.arange(len(expert)) - np.repeat(np.cumsum(have) - have, have)
    keep = rank < want[expert]
    return expert[keep], shard[keep]


def add(load, expert, shard, want, budget: Budget):
    """New replicas for experts below ``want``: heaviest first, dealt round the active shards
    with a free place from the least loaded (an expert's new replicas go to consecutive,
    so distinct, shards; the few that land on a shard holding their expert move on)."""
    have = np.bincount(expert, minlength=len(load))
    short = np.flatnonzero(want > have)
    if not len(short):
        return expert, shard
    N = budget.num_shards
    k = (want - have)[short]
    new_e = np.repeat(short, k)
    w = load[new_e] / want[new_e]
    new_e = new_e[np.lexsort((new_e, -w))]
    cap = budget.capacity or np.iinfo(np.int64).max
    counts = np.bincount(shard, minlength=N)
    sl = loads_of(load, expert, shard, N)
    dest = np.flatnonzero(budget.active() & (counts < cap))
    if not len(dest):
        return expert, shard
    dest = dest[np.argsort(sl[dest], kind="stable")]
    new_s = dest[np.arange(len(new_e)) % len(dest)]
    new_s = _distinct_holders(expert, shard, new_e, new_s, dest, N)
    expert = np.concatenate([expert, new_e])
    shard = np.concatenate([shard, new_s])
    over = np.bincount(shard, minlength=N) - cap
    if budget.capacity is not None and (over > 0).any():
        keep = np.ones(len(expert), bool)  # past a shard's places: the last added go again
        for n in np.flatnonzero(over > 0).tolist():
            keep[np.flatnonzero(shard == n)[-over[n] :]] = False
        expert, shard = expert[keep], shard[keep]
    return expert, shard


def _distinct_holders(expert, shard, new_e, new_s, dest, N: int) -> np.ndarray:
    """``new_s`` with every new replica that lands on a shard already holding its expert
    moved to the next shard of ``dest`` that does not (a loop over those few)."""
    held = np.sort(expert * N + shard)
    key = new_e * N + new_s
    pos = np.searchsorted(held, key).clip(max=len(held) - 1)
    clash = np.flatnonzero(held[pos] == key)
    if not len(clash):
        return new_s
    new_s = new_s.copy()
    for i in clash.tolist():
        e = new_e[i]
        taken = set(shard[expert == e].tolist()) | set(new_s[new_e == e].tolist())
        free = [n for n in dest.tolist() if n not in taken]
        if free:
            new_s[i] = free[0]
    return new_s


def evacuate(load, expert, shard, budget: Budget) -> np.ndarray:
    """Replicas on excluded shards go to active ones: heaviest first, round-robin over the
    active shards from the least loaded; an expert already on the chosen shard tries the next."""
    active = budget.active()
    stuck = np.flatnonzero(~active[shard])
    if not len(stuck):
        return shard
    N = budget.num_shards
    w = carried(load, expert)
    staying = np.ones(len(shard), bool)
    staying[stuck] = False
    sl = np.bincount(shard[staying], weights=w[staying], minlength=N)
    targets = np.flatnonzero(active)
    targets = targets[np.argsort(sl[targets], kind="stable")]
    stuck = stuck[np.argsort(-w[stuck], kind="stable")]
    out = shard.copy()
    out[stuck] = targets[np.arange(len(stuck)) % len(targets)]
    reps = np.bincount(expert, minlength=len(load))
    if reps.max() > 1:  # fix the few collisions of replicated experts
        A = len(targets)
        for i in np.flatnonzero(reps[expert[stuck]] > 1).tolist():
            r, e = stuck[i], expert[stuck[i]]
            others = set(out[(expert == e) & (np.arange(len(out)) != r)].tolist())
            for k in range(A):
                t = targets[(i + k) % A]
                if t not in others:
                    out[r] = t
                    break
    return out


@dataclass
class Movable:
    """The replicas a repair may move, and the shards' load and places of those it may not.
    Shapes: M movable replicas, N shards, E experts.

    rows:             [M] where the movable replicas sit in the full (expert, shard) arrays
    expert, shard, w: [M] expert, shard and carried load of each movable replica
    reps:             [E] replicas of each expert in all (movable or not)
    base, base_count: [N] load and replicas of the fixed ones on each shard
    """

    rows: np.ndarray
    expert: np.ndarray
    shard: np.ndarray
    w: np.ndarray
    reps: np.ndarray
    base: np.ndarray
    base_count: np.ndarray

    @classmethod
    def of(cls, load, expert, shard, N: int, limit: int | None = None) -> Movable:
        """All replicas movable, or (with ``limit``) only the ``limit`` heaviest."""
        reps = np.bincount(expert, minlength=len(load))
        w = load[expert] / reps[expert]
        base, base_count = np.zeros(N), np.zeros(N, np.int64)
        if limit is None or len(w) <= limit:
            return cls(np.arange(len(w)), expert, shard.copy(), w, reps, base, base_count)
        heavy = np.zeros(len(w), bool)
        heavy[np.argpartition(-w, limit - 1)[:limit]] = True
        rows = np.flatnonzero(heavy)
        base = np.bincount(shard[~heavy], weights=w[~heavy], minlength=N)
        base_count = np.bincount(shard[~heavy], minlength=N)
        return cls(rows, expert[rows], shard[rows], w[rows], reps, base, base_count)

    def loads(self, shard: np.ndarray | None = None) -> np.ndarray:
        s = self.shard if shard is None else shard
        return self.base + np.bincount(s, weights=self.w, minlength=len(self.base))

    def counts(self) -> np.ndarray:
        return self.base_count + np.bincount(self.shard, minlength=len(self.base))


def moves(items: Movable, budget: Budget, limit: np.ndarray, max_rounds: int = 64) -> None:
    """Rounds of :func:`move_round` (on ``items.shard``, in place) until balanced or stuck."""
    for _ in range(max_rounds):
        moved = move_round(items, budget, limit)
        if moved is None:
            break
        items.shard = moved


def move_round(items: Movable, budget: Budget, limit: np.ndarray):
    """One vectorised round of moves: every overloaded shard sends its heaviest replicas
    that fit under its excess to the shards with the most room (never to a shard that holds
    the expert, never past a shard's capacity). None when balanced or nothing can move."""
    N = budget.num_shards
    expert, shard, w, reps = items.expert, items.shard, items.w, items.reps
    sl = items.loads()
    drained = ~budget.active()
    stuck = drained[shard]  # replicas on a drained shard move whatever their weight
    if (sl <= limit + 1e-9).all() and not stuck.any():
        return None
    excess = np.maximum(sl - limit, 0)
    excess[drained] = np.inf
    room = np.maximum(limit - sl, 0)
    counts = items.counts()
    cap = budget.capacity or np.iinfo(np.int64).max
    room = np.where(counts < cap, room, 0)
    hot = excess[shard] > 0
    cand = np.flatnonzero(hot & (w <= excess[shard]) & (w <= room.max()))
    # heaviest first per shard; keep a prefix whose running sum stays within the excess
    cand = cand[np.lexsort((-w[cand], shard[cand]))]
    s = shard[cand]
    csum = np.cumsum(w[cand])
    starts = np.searchsorted(s, s, side="left")
    within = csum - (csum[starts] - w[cand][starts]) <= excess[s]
    cand = cand[within]
    # a shard whose every replica is bigger than its excess sends its smallest one, if that
    # still leaves it lighter than before and lands where it fits
    blocked = np.setdiff1d(np.flatnonzero(excess > 0), shard[cand])
    big = np.flatnonzero(hot & np.isin(shard, blocked) & (w <= room.max()))
    if len(big):
        big = big[np.lexsort((w[big], shard[big]))]
        first = np.unique(shard[big], return_index=True)[1]
        cand = np.concatenate([cand, big[first]])
    if not len(cand):
        return None
    cand, dest = _destinations(cand, w, room, counts, cap, budget.capacity is not None, N)
    multi = reps[expert[cand]] > 1
    if multi.any():  # never two replicas of one expert on a shard (only replicated ones can)
        mine = np.flatnonzero(reps[expert] > 1)
        taken = np.sort(expert[mine] * N + shard[mine])
        new_keys = expert[cand] * N + dest
        pos = np.searchsorted(taken, new_keys).clip(max=len(taken) - 1)
        keep = ~multi | (taken[pos] != new_keys)
        _, first = np.unique(new_keys, return_index=True)
        once = np.zeros(len(cand), bool)
        once[first] = True  # two replicas of one expert never move to the same shard
        cand, dest = cand[keep & once], dest[keep & once]
    if not len(cand):
        return None
    out = shard.copy()
    out[cand] = dest
    over = np.maximum(items.loads(out) - limit, 0)[~drained].sum()
    if not stuck.any() and over >= np.maximum(sl - limit, 0)[~drained].sum() * (1 - 1e-9):
        return None  # no progress: stop rather than oscillate
    return out


def _destinations(cand, w, room, counts, cap, capped: bool, N: int):
    """Fill the shards with the most room in turn (cumulative room); a replica that would
    straddle two shards' room waits for the next round."""
    dest_order = np.argsort(-room)
    cum_room = np.cumsum(room[dest_order])
    cand = cand[np.argsort(-w[cand])]
    end = np.cumsum(w[cand])
    pos = np.searchsorted(cum_room, end, side="left")
    prev = np.where(pos > 0, cum_room[np.maximum(pos - 1, 0)], 0.0)
    ok = (pos < len(dest_order)) & (end - w[cand] >= prev - 1e-9)
    if not ok.any():  # only straddlers: pair the heaviest with the roomiest, one each
        k = min(len(cand), len(dest_order))
        pos, ok = np.arange(len(cand)), np.zeros(len(cand), bool)
        ok[:k] = w[cand[:k]] <= room[dest_order[:k]]
    cand, dest = cand[ok], dest_order[pos[ok]]
    if capped and len(cand):  # at most cap - count arrivals per shard
        o = np.argsort(dest, kind="stable")
        arrivals = np.bincount(dest, minlength=N)
        rank = np.empty(len(o), np.int64)
        rank[o] = np.arange(len(o)) - np.repeat(np.cumsum(arrivals) - arrivals, arrivals)
        fits = rank < (cap - counts)[dest]
        cand, dest = cand[fits], dest[fits]
    return cand, dest


def split_hottest(load, expert, shard, sl, budget: Budget):
    """One more replica of the heaviest replica of the hottest shard, on the coldest shard
    without it (None when no expert there can be split)."""
    hot = int(np.argmax(sl))
    reps = np.bincount(expert, minlength=len(load))
    on = np.flatnonzero(shard == hot)
    w = load[expert[on]] / reps[expert[on]]
    active = budget.active()
    counts = np.bincount(shard, minlength=budget.num_shards)
    cap = budget.capacity or np.iinfo(np.int64).max
    for i in on[np.argsort(-w)][:8].tolist():
        e = int(expert[i])
        if e in budget.pins:
            continue
        holders = set(shard[expert == e].tolist())
        free = [
            n for n in np.argsort(sl).tolist() if active[n] and n not in holders and counts[n] < cap
        ]
        if free:
            return np.append(expert, e), np.append(shard, free[0])
    return None
