"""Pool-wide statistics: the routers' own counters merged into one view (pure)."""

from __future__ import annotations

from typing import Any

import numpy as np


def merge_stats(router_stats: list[dict], num_shards: int, num_experts: int, window_s: float):
    """Pure: combine routers' :meth:`Router.stats` into one pool-wide view."""
    reqs = [r for s in router_stats for r in s["requests"]]
    shard_load = np.zeros(num_shards, np.int64)
    expert_load = np.zeros(num_experts, np.int64)
    counters: dict[str, int] = {}
    for s in router_stats:
        shard_load[: len(s["shard_load"])] += s["shard_load"]
        expert_load += s["expert_load"]
        for k, v in s["counters"].items():
            counters[k] = counters.get(k, 0) + v
    out: dict[str, Any] = {"requests": len(reqs), "counters": counters}
    if reqs:
        ends = np.array([r[0] for r in reqs])
        recent = ends >= ends.max() - window_s
        lat = np.array([r[2] for r in reqs])[recent] * 1000
        tokens = np.array([r[1] for r in reqs])[recent]
        span = max(float(ends[recent].max() - ends[recent].min()), 1e-3)
        out.update(tokens_per_s=float(tokens.sum() / span) if recent.sum() > 1 else None,
                   latency_ms={"p50": float(np.percentile(lat, 50)),
                               "p99": float(np.percentile(lat, 99))})  # fmt: skip
    batches = [b for s in router_stats for b in s["batch_tokens"]]
    if batches:
        out["batch_tokens"] = {"mean": float(np.mean(batches)), "max": int(max(batches))}
    mean = shard_load.mean() if num_shards else 0
    out["pairs_per_shard"] = shard_load.tolist()
    out["imbalance"] = float(shard_load.max() / mean) if mean else 1.0
    out["expert_load"] = expert_load
    return out
