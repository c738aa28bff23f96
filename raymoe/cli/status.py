"""Show a pool: shards, experts, replicas, load, imbalance and placement version."""

from __future__ import annotations

import argparse

import numpy as np

from raymoe.cli import _common
from raymoe.reports import PoolDescription, PoolStats

TOP_EXPERTS = 10
WINDOW_S = 60.0


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window",
        type=float,
        default=WINDOW_S,
        help=f"seconds of traffic the numbers cover, ending now ({WINDOW_S:g})",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with _common.client(args) as c:
        d, s = c.describe(), c.stats(args.window)
    _common.emit(args, as_json(d, s), render(d, s))
    return 0


def hot_experts(s: PoolStats) -> list[tuple[int, int]]:
    """(expert, pairs) of the hottest experts in the window."""
    load = np.asarray(s.expert_load)
    hot = np.argsort(-load, kind="stable")[:TOP_EXPERTS]
    return [(int(e), int(load[e])) for e in hot if load[e] > 0]


def as_json(d: PoolDescription, s: PoolStats) -> dict:
    """describe + stats for scripts, with the per-expert load cut down to the hottest."""
    stats = {k: v for k, v in s.to_dict().items() if k != "expert_load"}
    stats["hot_experts"] = [{"expert": e, "pairs": n} for e, n in hot_experts(s)]
    return {"pool": d.to_dict(), "stats": stats}


def render(d: PoolDescription, s: PoolStats) -> str:
    lat = s.latency
    lines = [
        f"pool {d.name!r}  placement v{d.placement_version}  {d.shards} shards  "
        f"{d.routers} routers",
        f"experts {d.live_experts:,} live ({d.experts:,} ids)  replicas {d.replicas:,}"
        f"  imbalance {s.imbalance:.3f}",
        f"last {s.window_s:.0f} s: requests {s.requests:,}  tokens/s {s.tokens_per_s:,.0f}"
        f"  p50 {lat.p50_ms if lat else 0:.1f} ms  p99 {lat.p99_ms if lat else 0:.1f} ms",
    ]
    if d.pinned:
        lines.append(f"pinned {dict(sorted(d.pinned.items()))}")
    lines += [f"DEGRADED: {m}" for m in d.degraded]
    total = sum(s.pairs_per_shard) or 1
    lines += ["", f"{'SHARD':>5}  {'EXPERTS':>8}  {'PAIRS':>12}  {'LOAD':>6}"]
    for n, count in enumerate(d.experts_per_shard):
        p = s.pairs_per_shard[n] if n < len(s.pairs_per_shard) else 0
        state = "  drained" if n in d.drained else ""
        lines.append(f"{n:>5}  {count:>8,}  {p:>12,}  {100 * p / total:>5.1f}%{state}")
    hot = hot_experts(s)
    if hot:
        lines += ["", "hottest experts (pairs): " + ", ".join(f"{e} ({n:,})" for e, n in hot)]
    return "\n".join(lines)
