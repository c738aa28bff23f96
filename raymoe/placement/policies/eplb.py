"""``eplb``: the published greedy baseline (DeepSeek's EPLB), planned from scratch.

Replica counts by water-filling (the next replica to the expert with the highest load per
replica), then the heaviest replica to the lightest shard, one replica per shard per round
(equal counts per shard; never an expert twice on a shard). It ignores the current
placement, so it moves a lot; it is kept as the baseline the benchmarks compare against.
"""

from __future__ import annotations

import numpy as np

from raymoe.placement.budget import Budget, Plan
from raymoe.placement.policies.counts import water_fill
from raymoe.placement.table import Placement, realize


def eplb(load, current: Placement, budget: Budget, *, bytes_per_expert: int = 1) -> Plan:
    load = np.asarray(load, np.float64)
    N = budget.num_shards
    active = budget.active()
    A = int(active.sum())
    r = np.minimum(water_fill(load, budget), A)
    expert = np.repeat(np.arange(len(load)), r)
    w = load[expert] / np.maximum(r[expert], 1)
    order = np.lexsort((expert, -w))  # heaviest first; an expert's replicas side by side
    expert, w = expert[order], w[order]
    shard = np.empty_like(expert)
    shard_load = np.where(active, 0.0, np.inf)  # excluded shards are never the lightest
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
    return Plan.between(load, current, realize(current, expert, shard), budget, bytes_per_expert)


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
