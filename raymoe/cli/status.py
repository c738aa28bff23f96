"""Show a pool: shards, experts, replicas, load, imbalance and placement version."""

from __future__ import annotations

import argparse

import numpy as np

from raymoe.cli import _common
from raymoe.config import PoolSpec
from raymoe.reports import PoolDescription, PoolStats

TOP_EXPERTS = 10
WORST_LAYERS = 5
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


def hot_experts(d: PoolDescription, s: PoolStats) -> list[tuple[int, int, int]]:
    """(layer, expert, pairs) of the hottest experts in the window (ids of their layer)."""
    load = np.asarray(s.expert_load)
    hot = [int(e) for e in np.argsort(-load, kind="stable")[:TOP_EXPERTS] if load[e] > 0]
    if d.layers <= 1:
        return [(0, e, int(load[e])) for e in hot]
    flat = PoolSpec.from_dict(d.spec).flat
    return [(int(flat.layer_of[e]), int(flat.expert_of[e]), int(load[e])) for e in hot]


def as_json(d: PoolDescription, s: PoolStats) -> dict:
    """describe + stats for scripts, with the per-expert load cut down to the hottest."""
    stats = {k: v for k, v in s.to_dict().items() if k != "expert_load"}
    stats["hot_experts"] = [
        {"layer": layer, "expert": e, "pairs": n} for layer, e, n in hot_experts(d, s)
    ]
    return {"pool": d.to_dict(), "stats": stats}


def _layers(d: PoolDescription, s: PoolStats) -> list[str]:
    """A multi-layer pool's summary: experts per layer, the worst layers' imbalance."""
    live = d.live_per_layer
    lo, hi = (min(live), max(live)) if live else (0, 0)
    per = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
    lines = [f"layers {d.layers}  live experts per layer {per}"]
    imb = s.layer_imbalance
    if imb:
        worst = sorted(range(len(imb)), key=lambda i: -imb[i])[:WORST_LAYERS]
        shown = ", ".join(f"L{i} {imb[i]:.3f}" for i in worst)
        lines.append(f"imbalance by layer: worst {shown}; median {float(np.median(imb)):.3f}")
    return lines


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
    if d.layers > 1:
        lines += _layers(d, s)
    if d.pinned:
        lines.append(f"pinned {dict(sorted(d.pinned.items()))}")
    lines += [f"DEGRADED: {m}" for m in d.degraded]
    total = sum(s.pairs_per_shard) or 1
    lines += ["", f"{'SHARD':>5}  {'EXPERTS':>8}  {'PAIRS':>12}  {'LOAD':>6}"]
    for n, count in enumerate(d.experts_per_shard):
        p = s.pairs_per_shard[n] if n < len(s.pairs_per_shard) else 0
        state = "  drained" if n in d.drained else ""
        lines.append(f"{n:>5}  {count:>8,}  {p:>12,}  {100 * p / total:>5.1f}%{state}")
    hot = hot_experts(d, s)
    if hot and d.layers > 1:
        text = ", ".join(f"L{layer}/{e} ({n:,})" for layer, e, n in hot)
        lines += ["", "hottest layer/expert (pairs): " + text]
    elif hot:
        lines += ["", "hottest experts (pairs): " + ", ".join(f"{e} ({n:,})" for _, e, n in hot)]
    return "\n".join(lines)
