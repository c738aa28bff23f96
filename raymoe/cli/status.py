"""Show a pool: shards, experts, replicas, load, imbalance and placement version."""

from __future__ import annotations

import argparse

import numpy as np

from raymoe.cli import _common

TOP_EXPERTS = 10


def add_parser(p: argparse.ArgumentParser) -> None:
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with _common.client(args) as c:
        view = snapshot(c, window_s=60.0)
    _common.emit(args, view, render(view))
    return 0


def snapshot(client, window_s: float) -> dict:
    """describe + stats, with the per-expert load cut down to the hottest experts."""
    d, s = client.describe(), client.stats(window_s)
    load = np.asarray(s.pop("expert_load"))
    hot = np.argsort(-load, kind="stable")[:TOP_EXPERTS]
    s["hot_experts"] = [{"expert": int(e), "tokens": int(load[e])} for e in hot if load[e] > 0]
    removed = d["spec"]["experts"].get("removed", [])
    d["live_experts"] = d["experts"] - len(removed)
    return {"pool": d, "stats": s}


def render(view: dict) -> str:
    d, s = view["pool"], view["stats"]
    lat = s.get("latency_ms") or {}
    tps = s.get("tokens_per_s")
    lines = [
        f"pool {d['name']!r}  placement v{d['placement_version']}  {d['shards']} shards  "
        f"{d['routers']} routers",
        f"experts {d['live_experts']:,} live ({d['experts']:,} ids)  replicas {d['replicas']:,}"
        f"  imbalance {s['imbalance']:.3f}",
        f"requests {s['requests']:,}  tokens/s {tps or 0:,.0f}  p50 {lat.get('p50', 0):.1f} ms"
        f"  p99 {lat.get('p99', 0):.1f} ms",
    ]
    if d["degraded"]:
        lines += [f"DEGRADED: {m}" for m in d["degraded"]]
    pairs = s["pairs_per_shard"]
    total = sum(pairs) or 1
    lines += ["", f"{'SHARD':>5}  {'EXPERTS':>8}  {'PAIRS':>12}  {'LOAD':>6}"]
    for n, count in enumerate(d["experts_per_shard"]):
        p = pairs[n] if n < len(pairs) else 0
        lines.append(f"{n:>5}  {count:>8,}  {p:>12,}  {100 * p / total:>5.1f}%")
    if s["hot_experts"]:
        hot = ", ".join(f"{h['expert']} ({h['tokens']:,})" for h in s["hot_experts"])
        lines += ["", f"hottest experts (tokens): {hot}"]
    return "\n".join(lines)
