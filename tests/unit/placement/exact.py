"""The exact optimum of tiny placement problems, by exhaustive search (the test oracle).

Branch and bound over experts, heaviest first: for each, every replica count and every set
of shards with a free place (identical shards tried once), pruned by the best answer so far
and by the mean. It enumerates replica counts and packings completely, so its answer is the
optimal max shard load.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def optimum(load, num_shards: int, places: int, max_replicas: int) -> float:
    """min over replica counts and packings of the max shard load (``places`` per shard)."""
    L = np.sort(np.asarray(load, float))[::-1].tolist()
    E, N = len(L), num_shards
    budget = min(max_replicas, N * places)
    total = sum(L)
    best = [math.inf]
    shard_load = [0.0] * N
    count = [0] * N

    def dfs(i: int, cur_max: float, left: int) -> None:
        if i == E:
            best[0] = min(best[0], cur_max)
            return
        if max(cur_max, total / N) >= best[0] - 1e-12:
            return
        free = [n for n in range(N) if count[n] < places]
        rmax = min(len(free), left - (E - i - 1))
        for r in range(rmax, 0, -1):
            per = L[i] / r
            seen = set()
            for combo in itertools.combinations(free, r):
                key = tuple(sorted((shard_load[n], count[n]) for n in combo))
                if key in seen:  # identical shards: one of them is enough
                    continue
                seen.add(key)
                m = cur_max
                for n in combo:
                    shard_load[n] += per
                    count[n] += 1
                    m = max(m, shard_load[n])
                if m < best[0] - 1e-12:
                    dfs(i + 1, m, left - r)
                for n in combo:
                    shard_load[n] -= per
                    count[n] -= 1

    dfs(0, 0.0, budget)
    return best[0]
