"""Degrade mode's quality cost: a pool with ``faults.on_unreachable: degrade`` and no
replicas, one of its 4 shards frozen (SIGSTOP: silent, as on a dead node), answers with the
remaining experts of each token, renormalised. How far is that from the full answer?

For the Mixtral-style (``mixtral-tiny``: 8 experts, top-2) and the PEER (``peer-1m``) pools,
on 256 tokens: the share of tokens degraded, the relative L2 error of their outputs vs the
full pool's (and vs dropping the lost experts without renormalising, computed in process
from the same routes), the cosine similarity, and the time the degraded answer took. The
served degraded output is also checked against the in-process reference of renormalised
routes (max abs error).

    .venv/bin/python benchmarks/bench_degraded.py [--configs mixtral-tiny peer-1m]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

import ray
import torch

import raymoe
from raymoe import MoELayer, PoolSpec, load_spec
from raymoe._private.control.goal import Goal
from raymoe.store import open_store

CONFIGS = Path(__file__).parents[1] / "examples" / "configs"
SHARDS, TOKENS, LOST = 4, 256, 1


def pid_of(name: str) -> int:
    actor = ray.get_actor(name, namespace="raymoe")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T] ||a - b|| / ||b|| per row."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-30)


def one(config: str) -> dict:
    d = load_spec(CONFIGS / f"{config}.yaml").model_dump(mode="json")
    d["name"] = f"degraded-{config}"
    d["shards"] = {**d["shards"], "count": SHARDS, "replicas": {}}
    d["faults"] = {"on_unreachable": "degrade", "degrade_after_s": 0.2}
    spec = PoolSpec.from_dict(d)
    layer = MoELayer(spec).eval()
    x = torch.randn(TOKENS, spec.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, route = layer(x, return_info=True)
    pool = raymoe.serve(spec)
    try:
        p = Goal.load(open_store(), spec.name).placement
        shard_of = torch.from_numpy(p.shard[p.ptr[:-1]])  # one replica per expert
        ids, w = route.expert_ids, route.weights
        lost = (ids >= 0) & (shard_of[ids.clamp(min=0)] == LOST)
        kept = torch.where(lost, 0.0, w)
        total, left = w.sum(1, keepdim=True), kept.sum(1, keepdim=True)
        scaled = torch.where(left.abs() > 0, kept * total / left, 0.0)
        gone = torch.where(lost, -1, ids)
        with torch.no_grad():
            want = layer(x, expert_ids=gone, weights=scaled)
            dropped = layer(x, expert_ids=gone, weights=kept)
        assert (pool.forward(x) - full).abs().max() <= 1e-5  # the full pool first
        pid = pid_of(f"{spec.name}:shard:{LOST}")
        os.kill(pid, signal.SIGSTOP)
        try:
            t = time.perf_counter()
            y, info = pool.forward(x, return_info=True, timeout_s=30)
            took = time.perf_counter() - t
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        pool.shutdown()
    rows = lost.any(1)
    cos = torch.nn.functional.cosine_similarity(y[rows], full[rows], dim=-1)
    return {
        "config": config,
        "degraded": info.degraded_tokens,
        "expected": int(rows.sum()),
        "err_vs_ref": float((y - want).abs().max()),
        "rel_renorm": float(rel(y[rows], full[rows]).mean()),
        "rel_drop": float(rel(dropped[rows], full[rows]).mean()),
        "cos": float(cos.mean()),
        "pairs_lost": float(lost.sum() / (ids >= 0).sum()),
        "took_s": took,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["mixtral-tiny", "peer-1m"])
    args = ap.parse_args()
    os.environ.setdefault("RAYMOE_STORE_DIR", tempfile.mkdtemp(prefix="degraded-store-"))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="raymoe")
    print(
        f"one of {SHARDS} shards frozen, no replicas, {TOKENS} tokens; errors are mean "
        "relative L2 over the degraded tokens, vs the full pool"
    )
    print(
        f"{'config':<14}{'tokens degr.':>13}{'pairs lost':>11}{'renormalised':>13}"
        f"{'dropped only':>13}{'cosine':>8}{'answer in':>10}{'vs ref':>9}"
    )
    for config in args.configs:
        r = one(config)
        ok = r["degraded"] == r["expected"] and r["err_vs_ref"] <= 1e-5
        print(
            f"{r['config']:<14}{r['degraded']:>6}/{TOKENS:<6}{r['pairs_lost']:>11.1%}"
            f"{r['rel_renorm']:>13.3f}{r['rel_drop']:>13.3f}{r['cos']:>8.3f}"
            f"{r['took_s']:>9.2f}s{r['err_vs_ref']:>9.1e}  {'ok' if ok else 'MISMATCH'}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
