"""Replica counts: how many replicas each expert gets, before anything is placed."""

from __future__ import annotations

import numpy as np

from raymoe.placement.budget import Budget


def water_fill(load: np.ndarray, budget: Budget, total: int | None = None) -> np.ndarray:
    """[E] replicas per expert: pins exactly; the others at least the budget's floor (one,
    or ``min_replicas``), at most one per
    active shard, spending at most ``total`` replicas in all (default: what the budget
    allows) on the highest load per replica (bisection on the per-replica load: the
    vectorised form of EPLB's greedy)."""
    E, A = len(load), int(budget.active().sum())
    pinned = np.zeros(E, bool)
    r = np.full(E, budget.floor(), np.int64)
    for e, c in budget.pins.items():
        pinned[e], r[e] = True, c
    limit = budget.replica_limit() if total is None else total
    spare = limit - int(r.sum())
    free = np.flatnonzero(~pinned)
    hot, tau = heavy_experts(load[free], spare, A, budget.floor())
    r[free[hot]] = np.clip(np.ceil(load[free[hot]] / tau), budget.floor(), A).astype(np.int64)
    return r


def heavy_experts(load: np.ndarray, spare: int, A: int, base: int = 1) -> tuple[np.ndarray, float]:
    """(indices of the experts that get more than ``base`` replicas, per-replica load tau)
    when ``spare`` extra replicas go where the load per replica is highest (at most ``A``
    each).

    NOTE: an expert with load <= base * tau needs no extra replica, so at most ``spare`` experts
    are above tau: the bisection looks only at the ``spare`` + 1 heaviest (O(E) to find)."""
    if spare <= 0 or not len(load) or load.max() <= 0:
        return np.zeros(0, np.int64), float("inf")
    k = min(spare + 1, len(load))
    top = np.argpartition(-load, k - 1)[:k] if k < len(load) else np.arange(len(load))
    floor = load[top].min() if k < len(load) else 0.0
    sub = load[top]

    def extra(tau: float) -> int:
        return int((np.clip(np.ceil(sub / tau), base, A) - base).sum())

    lo, hi = 0.0, float(sub.max())  # hi: no expert needs a second replica
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid <= 0 or extra(mid) > spare:
            lo = mid
        else:
            hi = mid
    hi = max(hi, floor / base)  # the experts outside the top k need no extra replica
    return top[sub > hi * base], hi
