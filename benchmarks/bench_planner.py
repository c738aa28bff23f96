"""Placement planners side by side: ``eplb`` (the published greedy) vs ``incremental``.

For 1k, 64k, 256k and 1M experts over 64 shards under Zipf-skewed loads, starting from the
contiguous placement a pool starts with: planning time, the imbalance (max/mean shard load)
before and after, and the bytes of weights each plan would copy (PEER-1M experts: 2 * 256
fp32 values each; FFN-sized experts scale it linearly). Prints the ratios; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from raymoe.placement import Budget, contiguous, eplb, incremental

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_EXPERT = 2 * 256 * 4


def run(E: int, N: int, skew: float, extra: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    load = rng.zipf(skew, E).astype(np.float64).clip(max=1e7)
    rng.shuffle(load)
    current = contiguous(E, N)
    budget = Budget(N, max_replicas=E + max(N, int(extra * E)))
    out = {"experts": E, "shards": N, "zipf": skew}
    for name, policy in [("eplb", eplb), ("incremental", incremental)]:
        t = time.perf_counter()
        plan = policy(load, current, budget, bytes_per_expert=BYTES_PER_EXPERT)
        out[name] = {"seconds": time.perf_counter() - t, **plan.report()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", nargs="+", type=int, default=[1024, 65536, 262144, 1048576])
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--extra", type=float, default=0.01, help="replica budget beyond E, as a share")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner.json")
    args = ap.parse_args()
    rows = [run(E, args.shards, args.zipf, args.extra) for E in args.experts]
    print(
        f"{'experts':>9} {'policy':<12}{'seconds':>9}{'imb before':>12}{'imb after':>11}"
        f"{'replicas +':>11}{'MB moved':>10}"
    )
    for r in rows:
        for name in ("eplb", "incremental"):
            p = r[name]
            print(
                f"{r['experts']:>9} {name:<12}{p['seconds']:>9.3f}{p['imbalance_before']:>12.3f}"
                f"{p['imbalance_after']:>11.3f}{p['replicas_added']:>11,}"
                f"{p['bytes_moved'] / 1e6:>10.1f}"
            )
    print()
    for r in rows:
        e, i = r["eplb"], r["incremental"]
        share = i["bytes_moved"] / max(e["bytes_moved"], 1)
        print(
            f"{r['experts']:>9} experts: incremental is {e['seconds'] / i['seconds']:.1f}x "
            f"faster and moves {share:.1%} of eplb's bytes; under 1 s: "
            f"{'yes' if i['seconds'] < 1 else 'NO'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
