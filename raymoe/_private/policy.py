"""Placement policies: pure functions of (load, current placement, budget) -> a :class:`Plan`.

No Ray, no weights: a policy only decides where replicas live. Glossary as in placement.py;
in addition, a replica *carries* ``load[e] / replicas[e]`` (routers spread an expert's tokens
evenly over its replicas), a shard's load is the sum over its replicas, and *imbalance* is
max / mean shard load. Moving bytes means creating a replica where there was none: the bytes
of one expert's weights, copied once.

- :func:`eplb` is the published greedy baseline (DeepSeek's EPLB): give the next replica to
  the expert with the highest load per replica, then pack replicas heaviest-first onto the
  lightest shard with equal counts per shard. It plans from scratch, so it moves a lot.
- :func:`incremental` starts from the current placement and only repairs it: it replicates
  experts too hot for any one shard, drops replicas that cooled down, and moves the fewest
  (heaviest that fit) replicas from overloaded to underloaded shards until the target is met.

Both are vectorised with numpy: their loops run over rounds or iterations, never over experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from raymoe._private.placement import Placement


@dataclass(frozen=True)
class Budget:
    """What a policy may use. ``max_replicas`` >= E in all; ``capacity``: replicas a shard can
    hold (None: unbounded); ``pins``: expert -> exact replica count set by an operator."""

    num_shards: int
    max_replicas: int
    capacity: int | None = None
    pins: dict[int, int] = field(default_factory=dict)
    target: float = 1.05
    exclude: frozenset[int] = frozenset()  # shards being drained: they end up holding nothing

    def active(self) -> np.ndarray:
        """[N] bool: shards that may hold replicas."""
        mask = np.ones(self.num_shards, bool)
        mask[list(self.exclude)] = False
        return mask


@dataclass(frozen=True)
class Plan:
    placement: Placement
    replicas_added: int  # copies of weights to make (each one expert's bytes)
    replicas_dropped: int
    bytes_moved: int
    imbalance_before: float
    imbalance_after: float

    def report(self) -> dict:
        return {"version": self.placement.version, "replicas_added": self.replicas_added,
                "replicas_dropped": self.replicas_dropped, "bytes_moved": self.bytes_moved,
                "imbalance_before": self.imbalance_before,
                "imbalance_after": self.imbalance_after}  # fmt: skip


# --- assignments: the (expert, shard) pairs of a placement, as flat numpy arrays -------------


def pairs(p: Placement) -> tuple[np.ndarray, np.ndarray]:
    """(expert [R], shard [R]) of every replica, in CSR order."""
    counts = (p.ptr[1:] - p.ptr[:-1]).numpy()
    return np.repeat(np.arange(p.num_experts), counts), p.shard.numpy().copy()


def shard_loads(load: np.ndarray, expert: np.ndarray, shard: np.ndarray, n: int) -> np.ndarray:
    reps = np.bincount(expert, minlength=len(load))
    return np.bincount(shard, weights=load[expert] / reps[expert], minlength=n)


def imbalance(shard_load: np.ndarray) -> float:
    mean = shard_load.mean()
    return float(shard_load.max() / mean) if mean > 0 else 1.0


def realize(current: Placement, expert: np.ndarray, shard: np.ndarray, version: int) -> Placement:
    """A placement holding exactly the (expert, shard) pairs given. Replicas that already
    exist keep their local index; new ones are appended after the largest local index in use
    on their shard, so no index an in-flight batch of ``current`` reads is ever reused."""
    E, N = current.num_experts, current.num_shards
    old_e, old_s = pairs(current)
    old_key = old_e.astype(np.int64) * N + old_s
    key = expert.astype(np.int64) * N + shard
    order = np.argsort(old_key)
    pos = np.searchsorted(old_key[order], key).clip(max=len(order) - 1)
    found = old_key[order][pos] == key
    local = np.where(found, current.local.numpy()[order][pos], -1)
    top = np.full(N, -1, np.int64)
    np.maximum.at(top, old_s, current.local.numpy())
    new = ~found
    if new.any():
        s_new = shard[new]
        o = np.argsort(s_new, kind="stable")
        counts = np.bincount(s_new, minlength=N)
        rank = np.arange(len(o)) - np.repeat(np.cumsum(counts) - counts, counts)
        filled = np.empty(len(o), np.int64)
        filled[o] = top[s_new[o]] + 1 + rank
        local[new] = filled
    o = np.lexsort((shard, expert))
    ptr = np.zeros(E + 1, np.int64)
    ptr[1:] = np.cumsum(np.bincount(expert, minlength=E))
    return Placement(version, N, torch.from_numpy(ptr), torch.from_numpy(shard[o].astype(np.int64)),
                     torch.from_numpy(local[o].astype(np.int64)))  # fmt: skip


def _plan(current, load, expert, shard, version, bytes_per_expert) -> Plan:
    N = current.num_shards
    old_e, old_s = pairs(current)
    new = realize(current, expert, shard, version)
    added = _count_new(old_e, old_s, expert, shard, N)
    dropped = len(old_e) - (len(expert) - added)
    before = imbalance(shard_loads(load, old_e, old_s, N))
    after = imbalance(shard_loads(load, expert, shard, N))
    return Plan(new, added, dropped, added * bytes_per_expert, before, after)


def _count_new(old_e, old_s, expert, shard, N) -> int:
    old_key = np.sort(old_e.astype(np.int64) * N + old_s)
    key = expert.astype(np.int64) * N + shard
    pos = np.searchsorted(old_key, key).clip(max=len(old_key) - 1)
    return int((old_key[pos] != key).sum())


# --- replica counts -----------------------------------------------------------------------


def replica_counts(load: np.ndarray, budget: Budget) -> np.ndarray:
    """Replicas per expert: pins exactly; the others >= 1, at most one per shard, spending at
    most ``max_replicas`` in all on the highest load per replica (water-filling by bisection
    on the per-replica load, the vectorised form of EPLB's greedy)."""
    E, N = len(load), int(budget.active().sum())
    pinned = np.zeros(E, bool)
    r = np.ones(E, np.int64)
    for e, c in budget.pins.items():
        pinned[e], r[e] = True, c
    spare = budget.max_replicas - int(r.sum())
    if spare <= 0 or not (load[~pinned] > 0).any():
        return r
    free = ~pinned

    def counts(tau: float) -> np.ndarray:
        return np.clip(np.ceil(load / tau), 1, N).astype(np.int64)

    lo, hi = 0.0, float(load[free].max())  # hi: every free expert gets 1
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid <= 0 or int(counts(mid)[free].sum()) - int(free.sum()) > spare:
            lo = mid
        else:
            hi = mid
    r[free] = counts(hi)[free]
    return r


# --- eplb -----------------------------------------------------------------------------------


def eplb(load, current: Placement, budget: Budget, *, bytes_per_expert=1, version=None) -> Plan:
    """EPLB's greedy from scratch: replica counts, then heaviest replica to the lightest shard,
    one replica per shard per round (equal counts per shard; no expert twice on a shard)."""
    load = np.asarray(load, np.float64)
    N = budget.num_shards
    r = np.minimum(replica_counts(load, budget), int(budget.active().sum()))
    expert = np.repeat(np.arange(len(load)), r)
    w = load[expert] / r[expert]
    order = np.lexsort((expert, -w))  # heaviest first; an expert's replicas side by side
    expert, w = expert[order], w[order]
    shard = np.empty_like(expert)
    shard_load = np.where(budget.active(), 0.0, np.inf)  # excluded shards are never lightest
    A = int(budget.active().sum())
    held: list[set] = [set() for _ in range(N)]
    for start in range(0, len(expert), A):  # NOTE: a loop over rounds of A replicas
        items = slice(start, min(start + A, len(expert)))
        targets = np.argsort(shard_load, kind="stable")[: items.stop - items.start]
        es = expert[items]
        multi = r[es] > 1  # only replicated experts can collide on a shard
        pairs_ = zip(es[multi].tolist(), targets[multi].tolist(), strict=True)
        if multi.any() and any(e in held[t] for e, t in pairs_):
            targets = _distinct(es, targets, held, shard_load)
        shard[items] = targets
        np.add.at(shard_load, targets, w[items])
        for e, t in zip(es[multi].tolist(), targets[multi].tolist(), strict=True):
            held[t].add(e)
    version = current.version + 1 if version is None else version
    return _plan(current, load, expert, shard, version, bytes_per_expert)


def _distinct(es: np.ndarray, targets: np.ndarray, held: list[set], shard_load) -> np.ndarray:
    """Re-pair a round's replicas with shards so that no shard gets an expert twice: each
    takes the lightest shard not holding it and not taken in this round."""
    out = np.empty_like(targets)
    used: set[int] = set()
    by_load = np.argsort(shard_load, kind="stable").tolist()
    for i, e in enumerate(es.tolist()):
        t = next((t for t in by_load if t not in used and e not in held[t]), None)
        if t is None:  # every shard holds it: keep the round's own pick
            t = next(t for t in targets.tolist() if t not in used)
        out[i] = t
        used.add(t)
    return out


# --- incremental ----------------------------------------------------------------------------


def incremental(load, current: Placement, budget: Budget, *, bytes_per_expert=1,
                version=None, max_rounds: int = 64) -> Plan:  # fmt: skip
    """Repair ``current`` until imbalance <= ``budget.target``, moving as few replicas as it can.

    1. Replica counts: pins exactly; an expert whose load per replica would not fit in half a
       shard's share gets more replicas (within the budget, hottest first); replicas beyond
       what an expert needs are dropped (the cooled-down ones) from the most loaded shards.
    2. Rounds of moves: every overloaded shard sends its heaviest replicas that fit under its
       excess to the shards with the most room (never to a shard already holding the expert,
       never beyond a shard's capacity).
    """
    load = np.asarray(load, np.float64)
    E, N = len(load), budget.num_shards
    expert, shard = pairs(current)
    have = np.bincount(expert, minlength=E)
    active = budget.active()
    mean = load.sum() / active.sum()
    limit = np.where(active, budget.target * mean, 0.0)  # [N]; drained shards must empty
    want = _wanted_counts(load, have, budget, budget.target * mean)
    expert, shard = _drop(load, expert, shard, have, want, N)
    expert, shard = _add(load, expert, shard, want, budget)
    shard = _evacuate(load, expert, shard, budget)
    shard = _moves(load, expert, shard, want, budget, limit, max_rounds)
    # still over the target with replicas to spare: split the heaviest replica of the
    # hottest shard onto the coldest shard without it, then move again
    for _ in range(max_rounds):
        spare = budget.max_replicas - len(expert)
        sl = shard_loads(load, expert, shard, N)
        if spare <= 0 or (sl <= limit + 1e-9).all():
            break
        grown = _split_hottest(load, expert, shard, sl, budget)
        if grown is None:
            break
        expert, shard = grown
        shard = _moves(load, expert, shard, want, budget, limit, max_rounds)
    version = current.version + 1 if version is None else version
    plan = _plan(current, load, expert, shard, version, bytes_per_expert)
    forced = budget.exclude or any(int(current.replicas()[e]) != c for e, c in budget.pins.items())
    if plan.imbalance_after > plan.imbalance_before and not forced:
        return _plan(current, load, *pairs(current), current.version, bytes_per_expert)
    if plan.replicas_added > E // 4:
        # NOTE: a repair this big may cost more than planning from scratch (small pools
        # under heavy skew): then take whichever plan balances better, or moves less
        fresh = eplb(load, current, budget, bytes_per_expert=bytes_per_expert, version=version)
        if _better(fresh, plan, budget.target):
            return fresh
    return plan


def _better(a: Plan, b: Plan, target: float) -> bool:
    """Whether plan ``a`` beats ``b``: meeting the target first, then fewer bytes, then
    a lower imbalance."""
    ok_a, ok_b = a.imbalance_after <= target, b.imbalance_after <= target
    if ok_a != ok_b:
        return ok_a
    if ok_a:
        return a.bytes_moved < b.bytes_moved
    return (a.imbalance_after, a.bytes_moved) < (b.imbalance_after, b.bytes_moved)


def _moves(load, expert, shard, want, budget, limit, max_rounds):
    for _ in range(max_rounds):
        moved = _move_round(load, expert, shard, want, budget, limit)
        if moved is None:
            break
        shard = moved
    return shard


def _split_hottest(load, expert, shard, sl, budget: Budget):
    hot = int(np.argmax(sl))
    reps = np.bincount(expert, minlength=len(load))
    on = np.nonzero(shard == hot)[0]
    w = load[expert[on]] / reps[expert[on]]
    active = budget.active()
    counts = np.bincount(shard, minlength=budget.num_shards)
    cap = budget.capacity or np.iinfo(np.int64).max
    for i in on[np.argsort(-w)][:8].tolist():
        e = int(expert[i])
        if e in budget.pins:
            continue
        holders = set(shard[expert == e].tolist())
        free = [n for n in np.argsort(sl).tolist()
                if active[n] and n not in holders and counts[n] < cap]  # fmt: skip
        if free:
            return np.append(expert, e), np.append(shard, free[0])
    return None


def _wanted_counts(load, have, budget: Budget, limit: float) -> np.ndarray:
    E, N = len(load), int(budget.active().sum())
    # NOTE: only an expert too hot for any one shard needs more replicas
    need = np.clip(np.ceil(load / max(limit, 1e-12)), 1, N).astype(np.int64)
    want = np.maximum(need, 1)
    # keep existing replicas that still help (hysteresis: drop only when twice as many)
    keep = (have > want) & (have <= 2 * want)
    want = np.where(keep, have, want)
    for e, c in budget.pins.items():
        want[e] = c
    over = int(want.sum()) - budget.max_replicas
    if over > 0:  # trim the least loaded per replica first, never below 1 or a pin
        pinned = np.zeros(E, bool)
        pinned[list(budget.pins)] = True
        extra = np.where(pinned, 0, want - 1)
        per = load / np.maximum(want, 1)
        for e in np.argsort(per)[extra[np.argsort(per)] > 0]:
            cut = min(over, int(extra[e]))
            want[e] -= cut
            over -= cut
            if over <= 0:
                break
    return want


def _drop(load, expert, shard, have, want, N):
    """Remove replicas beyond ``want``, taking them off the most loaded shards first."""
    if not (have > want).any():
        return expert, shard
    sl = shard_loads(load, expert, shard, N)
    order = np.lexsort((sl[shard], expert))  # per expert, least loaded shards first (kept)
    expert, shard = expert[order], shard[order]
    rank = np.arange(len(expert)) - np.repeat(np.cumsum(have) - have, have)
    keep = rank < want[expert]
    return expert[keep], shard[keep]


def _add(load, expert, shard, want, budget: Budget):
    """New replicas for experts below ``want``, on the least loaded shards without one."""
    have = np.bincount(expert, minlength=len(load))
    short = np.nonzero(want > have)[0]
    if not len(short):
        return expert, shard
    N = budget.num_shards
    sl = np.where(budget.active(), shard_loads(load, expert, shard, N), np.inf)
    counts = np.bincount(shard, minlength=N)
    cap = budget.capacity or np.iinfo(np.int64).max
    holders = {int(e): set(shard[expert == e].tolist()) for e in short}  # few hot experts
    add_e, add_s = [], []
    for e in short[np.argsort(-load[short])].tolist():
        for _ in range(int(want[e] - have[e])):
            room = [s for s in np.argsort(sl).tolist()
                    if s not in holders[e] and counts[s] < cap and np.isfinite(sl[s])]  # fmt: skip
            if not room:
                break
            s = room[0]
            holders[e].add(s)
            counts[s] += 1
            sl[s] += load[e] / want[e]
            add_e.append(e)
            add_s.append(s)
    return (np.concatenate([expert, np.array(add_e, np.int64)]),
            np.concatenate([shard, np.array(add_s, np.int64)]))  # fmt: skip


def _evacuate(load, expert, shard, budget: Budget) -> np.ndarray:
    """Replicas on excluded shards go to active ones: heaviest first, round-robin over the
    active shards from the least loaded; an expert already on the chosen shard tries the next."""
    active = budget.active()
    stuck = np.nonzero(~active[shard])[0]
    if not len(stuck):
        return shard
    N = budget.num_shards
    reps = np.bincount(expert, minlength=len(load))
    w = load[expert] / reps[expert]
    sl = np.bincount(shard[~np.isin(np.arange(len(shard)), stuck)],
                     weights=w[~np.isin(np.arange(len(shard)), stuck)], minlength=N)  # fmt: skip
    targets = np.nonzero(active)[0]
    targets = targets[np.argsort(sl[targets], kind="stable")]
    stuck = stuck[np.argsort(-w[stuck], kind="stable")]
    out = shard.copy()
    out[stuck] = targets[np.arange(len(stuck)) % len(targets)]
    if reps.max() > 1:  # fix the few collisions of replicated experts
        A = len(targets)
        for i in np.nonzero(reps[expert[stuck]] > 1)[0].tolist():
            r, e = stuck[i], expert[stuck[i]]
            others = set(out[(expert == e) & (np.arange(len(out)) != r)].tolist())
            for k in range(A):
                t = targets[(i + k) % A]
                if t not in others:
                    out[r] = t
                    break
    return out


def _move_round(load, expert, shard, want, budget: Budget, limit: np.ndarray):
    """One vectorised round of moves; None when balanced or when nothing can move."""
    N = budget.num_shards
    reps = np.bincount(expert, minlength=len(load))
    w = load[expert] / reps[expert]
    sl = np.bincount(shard, weights=w, minlength=N)
    drained = ~budget.active()
    stuck = drained[shard]  # replicas on a drained shard move whatever their weight
    if (sl <= limit + 1e-9).all() and not stuck.any():
        return None
    excess = np.maximum(sl - limit, 0)
    excess[drained] = np.inf
    room = np.maximum(limit - sl, 0)
    counts = np.bincount(shard, minlength=N)
    cap = budget.capacity or np.iinfo(np.int64).max
    room = np.where(counts < cap, room, 0)
    # candidates: replicas on overloaded shards that fit under their shard's excess
    hot = excess[shard] > 0
    cand = np.nonzero(hot & (w <= excess[shard]) & (w <= room.max()))[0]
    # heaviest first per shard; keep a prefix whose running sum stays within the excess
    cand = cand[np.lexsort((-w[cand], shard[cand]))]
    s = shard[cand]
    csum = np.cumsum(w[cand])
    starts = np.searchsorted(s, s, side="left")
    within = csum - (csum[starts] - w[cand][starts]) <= excess[s]
    cand = cand[within]
    # a shard whose every replica is bigger than its excess sends its smallest one, if that
    # still leaves it lighter than before and lands where it fits
    stuck = np.setdiff1d(np.nonzero(excess > 0)[0], shard[cand])
    big = np.nonzero(hot & np.isin(shard, stuck) & (w <= room.max()))[0]
    if len(big):
        big = big[np.lexsort((w[big], shard[big]))]
        first = np.unique(shard[big], return_index=True)[1]
        cand = np.concatenate([cand, big[first]])
    if not len(cand):
        return None
    # destinations: fill the shards with the most room in turn (cumulative room); a replica
    # that would straddle two shards' room waits for the next round
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
    if budget.capacity is not None and len(cand):  # at most cap - count arrivals per shard
        o = np.argsort(dest, kind="stable")
        arrivals = np.bincount(dest, minlength=N)
        rank = np.empty(len(o), np.int64)
        rank[o] = np.arange(len(o)) - np.repeat(np.cumsum(arrivals) - arrivals, arrivals)
        fits = rank < (cap - counts)[dest]
        cand, dest = cand[fits], dest[fits]
    # never two replicas of one expert on a shard
    key = expert * N
    taken = set((key + shard).tolist()) if reps.max() > 1 else None
    if taken is not None:
        new_keys = (key[cand] + dest).tolist()
        keep = np.array([k not in taken for k in new_keys], bool)
        _, first = np.unique(np.array(new_keys, np.int64), return_index=True)
        once = np.zeros(len(cand), bool)
        once[first] = True  # two replicas of one expert never move to the same shard
        cand, dest = cand[keep & once], dest[keep & once]
    if not len(cand):
        return None
    out = shard.copy()
    out[cand] = dest
    after = shard_loads(load, expert, out, N)
    if not stuck.any() and after.max() >= sl.max():
        return None  # no progress: stop rather than oscillate
    return out


# --- autoscaling and aux-loss-free bias -------------------------------------------------------


def shards_for(rate: float, shards: int, *, target: float, down_below: float, lo: int,
               hi: int) -> int:  # fmt: skip
    """The shard count for ``rate`` tokens/s, with hysteresis: above ``target`` per shard,
    grow to the count that carries the rate at 80% of the target; shrink only when one shard
    fewer would carry at most ``down_below`` x target each. Always within [lo, hi]."""
    fit = max(1, math.ceil(rate / (0.8 * target)))
    if rate > target * shards:
        want = fit
    elif shards > 1 and rate <= down_below * target * (shards - 1):
        want = min(fit, shards - 1)
    else:
        want = shards
    return int(min(max(want, lo), hi))


def bias_step(bias: np.ndarray, counts: np.ndarray, rate: float, live: np.ndarray) -> np.ndarray:
    """DeepSeek-V3's aux-loss-free update: each live expert's selection bias moves by ``rate``
    towards balance (up when it got fewer tokens than the mean, down when more)."""
    mean = counts[live].mean() if live.any() else 0.0
    out = bias.copy()
    out[live] += rate * np.sign(mean - counts[live])
    return out
