"""Node loss: a worker node of a three-node local Ray cluster removed without grace (its
raylet and every worker on it SIGKILLed) under 4 clients, every expert replicated on
distinct nodes (``shards.min_replicas: 2``).

Each run starts its own cluster (``ray.cluster_utils.Cluster``: a head and two workers, one
shard on each node: Ray's SPREAD scheduling), serves a pool, lets the clients run, removes
the worker node holding the most shards (with whatever else Ray placed there: a router,
the controller), and
keeps the clients running ``--after`` seconds. Ray's own node-death detection is left at its
defaults. Prints, per run: requests, failed ones, the worst error vs MoELayer, the slowest
request after the removal, when every expert was served again (a probe routing one token to
each expert), and when the pool had every expert on two live nodes again (or on the one
node holding every shard, when Ray restarted them all there). ``--json`` prints one
JSON line per run instead (the integration test reads it).

    .venv/bin/python benchmarks/bench_node_loss.py [--runs 5] [--after 6]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

import raymoe
from raymoe import MoELayer, PoolSpec
from raymoe._private.control.goal import Goal
from raymoe.store import open_store

E, D = 16, 32


def spec() -> PoolSpec:
    return PoolSpec.from_dict(
        {
            "name": "nodeloss",
            "d_model": D,
            "experts": {"kind": "ffn", "num_experts": E, "hidden": 64},
            "routing": {"kind": "topk", "k": 2},
            "shards": {"count": 3, "routers": 2, "min_replicas": 2},
            "control": {"auto_rebalance": False},
        }
    )


def actor_nodes() -> dict[str, str]:
    """name -> node id of the pool's live actors."""
    return {
        a.name: a.node_id
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.name.startswith("nodeloss:")
    }


def spread_ok(pool, nodes: dict[str, str], dead: str | None = None, need: int = 1) -> bool:
    """Whether every expert has replicas on two live nodes, or on every node holding
    shards if fewer (as the pool's saved goal says), and shards are on ``need`` nodes."""
    d = pool.describe()
    shard_node = {int(n.split(":")[2]): v for n, v in nodes.items() if ":shard:" in n}
    if len(shard_node) < d.shards or d.degraded or dead in shard_node.values():
        return False
    p = Goal.load(open_store(), pool.name).placement
    want = min(2, len(set(shard_node.values())))
    if want < need:
        return False
    return all(
        len({shard_node[int(s)] for s in p.shard[p.ptr[e] : p.ptr[e + 1]]}) >= want
        for e in range(E)
    )


def shard_nodes() -> set[str]:
    return {v for n, v in actor_nodes().items() if ":shard:" in n}


def wait(cond, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(what)
        time.sleep(0.1)
    return time.monotonic() - t0


def one_run(run: int, after_s: float, clients: int) -> dict:
    os.environ["RAYMOE_STORE_DIR"] = tempfile.mkdtemp(prefix="nodeloss-store-")
    os.environ["RAYMOE_WEIGHTS_DIR"] = tempfile.mkdtemp(prefix="nodeloss-weights-")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    workers = [cluster.add_node(num_cpus=4) for _ in range(2)]  # slots for workers
    ray.init(address=cluster.address, namespace="raymoe", log_to_driver=False)
    wait(lambda: sum(n["Alive"] for n in ray.nodes()) == 3, 60, "three nodes")
    s = spec()
    layer = MoELayer(s).eval()
    pool = raymoe.serve(s)
    try:
        wait(lambda: spread_ok(pool, actor_nodes(), need=2), 60, "replicas on two nodes")
        return _measure(run, pool, layer, cluster, workers, after_s, clients)
    finally:
        pool.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _measure(run, pool, layer, cluster, workers, after_s, clients) -> dict:
    nodes = actor_nodes()
    held = {
        w: sum(1 for n, v in nodes.items() if ":shard:" in n and v == w.node_id) for w in workers
    }
    victim = max(held, key=held.get)
    assert held[victim] > 0, f"no worker node holds a shard: {nodes}"
    lost = sorted(n.split(":", 1)[1] for n, v in nodes.items() if v == victim.node_id)
    stop, lat, failures, errs = threading.Event(), [], [], [0.0]

    def client(i):
        rng = np.random.default_rng(100 * run + i)
        while not stop.is_set():
            x = rng.standard_normal((8, D)).astype(np.float32)
            t = time.monotonic()
            try:
                y = pool.forward(x, timeout_s=30)
            except Exception as e:
                failures.append(repr(e)[:200])
                continue
            lat.append((t, time.monotonic() - t))
            with torch.no_grad():
                err = float(np.abs(y - layer(torch.from_numpy(x)).numpy()).max())
            errs[0] = max(errs[0], err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    probe_x = np.random.default_rng(run).standard_normal((E, D)).astype(np.float32)
    probe_ids = np.arange(E).reshape(E, 1)
    probe_w = np.ones((E, 1), np.float32)
    t_kill = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    pool.forward(probe_x, expert_ids=probe_ids, weights=probe_w, timeout_s=30)
    every_expert_s = time.monotonic() - t_kill
    time.sleep(max(0.0, after_s - (time.monotonic() - t_kill)))
    stop.set()
    for t in threads:
        t.join()
    respread_s = after_s + wait(
        lambda: spread_ok(pool, actor_nodes(), victim.node_id), 180, "spread again"
    )
    after = len(shard_nodes())
    later = [d for t, d in lat if t + d >= t_kill]  # in flight at the removal, or after
    return {
        "run": run,
        "requests": len(lat),
        "failed": len(failures),
        "failures": failures[:3],
        "max_abs_error": errs[0],
        "slowest_after_s": max(later, default=0.0),
        "p50_ms": float(np.median([d for _, d in lat]) * 1e3),
        "every_expert_served_s": every_expert_s,
        "spread_again_s": respread_s,
        "lost": lost,
        "shard_nodes_after": after,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--after", type=float, default=6.0, help="seconds of traffic after")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    for run in range(args.runs):
        r = one_run(run, args.after, args.clients)
        results.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(
                f"run {run}: {r['requests']} requests, {r['failed']} failed, "
                f"max err {r['max_abs_error']:.1e}, slowest after removal "
                f"{r['slowest_after_s'] * 1e3:.0f} ms (p50 {r['p50_ms']:.1f} ms), every "
                f"expert served {r['every_expert_served_s'] * 1e3:.0f} ms after, on two "
                f"nodes again after {r['spread_again_s']:.1f} s (lost: {', '.join(r['lost'])}; "
                f"shards on {r['shard_nodes_after']} nodes after)",
                flush=True,
            )
            for f in r["failures"]:
                print("  failed:", f)
    if args.json:
        return
    ok = all(r["failed"] == 0 and r["slowest_after_s"] <= 1.0 for r in results)
    err = max(r["max_abs_error"] for r in results)
    print(f"{'PASS' if ok else 'MISS'}  0 failed, slowest <= 1 s in {len(results)} runs in a row")
    print(f"{'PASS' if err <= 1e-5 else 'MISS'}  errors <= 1e-5 (max {err:.1e})")


if __name__ == "__main__":
    main()
