"""Where a 16-token request's time goes: a profile per stage, over both shard transports,
straight from the caller to the shards (the direct path of small requests), through a
router, and through the gateway, beside the in-process layer and the floors measured in the
same run (a Ray actor call, a fan-out to the pool's shards, a gRPC unary echo).

For each transport one pool (``--config``, mixtral-tiny) is served with its gateway on
loopback, and 16-token requests go one at a time through ``PoolHandle`` (direct), a handle
that sends everything through a router (``raymoe.connect(name, direct=False)``), and
``raymoe.Client``. The routers report the seconds of their stages (gate, dispatch, combine)
per batch, and the handle those of its direct requests; the shards' expert compute is timed
in process on the sub-batches a router sends them (the dispatch stage includes it). What is
left is the hop: the call to the router, its queue and the reply, or for the direct path
the caller's own checks and bookkeeping.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_latency.py [--n 300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import ray
import torch
from _timing import latency_ms, median_time
from bench_gateway import grpc_echo_ms
from bench_grpc_fanout import measure as grpc_fan_out

import raymoe
from raymoe import MoELayer, PoolSpec
from raymoe._private.data.dispatch import DispatchTable, split_by_shard
from raymoe._private.data.shard import ExpertShard
from raymoe.placement import initial

ROOT = Path(__file__).resolve().parents[1]


@ray.remote(num_cpus=0)
class Echo:
    def call(self, x):
        return x


def ray_floors(shards: int, x: np.ndarray, n: int) -> dict:
    """p50 (ms) of one actor call carrying ``x`` both ways, and of a fan-out to ``shards``
    actors awaited together (what a router's dispatch costs before any compute)."""
    actors = [Echo.remote() for _ in range(shards)]
    ray.get([a.call.remote(x) for a in actors])
    one = latency_ms(lambda: ray.get(actors[0].call.remote(x)), n)["p50"]
    fan = latency_ms(lambda: ray.get([a.call.remote(x) for a in actors]), n)["p50"]
    for a in actors:
        ray.kill(a)
    return {"actor_call": one, "fan_out": fan}


def shard_compute_ms(spec: PoolSpec, layer: MoELayer, x: torch.Tensor, reps: int) -> float:
    """The slowest shard's expert compute (ms) for ``x`` split as a router splits it."""
    placement = initial(spec.num_experts, spec.shards.count, replicas=spec.shards.replicas)
    with torch.no_grad():
        routes = layer.route(x, x)
    subs = split_by_shard(routes.ids, routes.weights, DispatchTable(placement))
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.shards.shard_threads)  # as in a shard actor
    worst = 0.0
    for s in subs:
        shard = ExpertShard(spec, s.shard, placement.shard_experts(s.shard))
        xs, ids, w = x[s.tokens].numpy(), s.local_ids.numpy(), s.weights.float().numpy()
        worst = max(worst, median_time(lambda: shard.compute(xs, ids, w), reps))  # noqa: B023
    torch.set_num_threads(threads)
    return worst * 1e3


def router_stages(name: str) -> dict:
    """Every router's stage seconds and batch count so far, summed."""
    out = {"route": 0.0, "dispatch": 0.0, "combine": 0.0, "batches": 0}
    for i in range(8):
        try:
            r = ray.get_actor(f"{name}:router:{i}", namespace="raymoe")
        except ValueError:
            break
        st = ray.get(r.stats.remote(3600.0))
        for k in ("route", "dispatch", "combine"):
            out[k] += st["stage_s"].get(k, 0.0)
        out["batches"] += st["counters"]["batches"]
    return out


def per_batch_ms(before: dict, after: dict) -> dict:
    n = max(after["batches"] - before["batches"], 1)
    return {k: (after[k] - before[k]) / n * 1e3 for k in ("route", "dispatch", "combine")}


def profile(base: PoolSpec, transport: str, x: torch.Tensor, n: int) -> dict:
    data = base.model_dump(mode="json")
    data["name"] = f"lat-{transport}"
    data["shards"]["transport"] = transport
    data["gateway"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    spec = PoolSpec.from_dict(data)
    pool = raymoe.serve(spec)
    layer = MoELayer(spec).eval()
    out = {}
    try:
        (endpoint,) = pool.gateways()
        routed = raymoe.connect(spec.name, direct=False)
        with raymoe.Client(endpoint) as client, torch.no_grad():
            paths = (("direct", pool), ("router", routed), ("client", client))
            for via, handle in paths:
                latency_ms(lambda h=handle: h.forward(x), 50, 0)  # warm-up
                if via == "direct":
                    y, info = pool.forward(x, return_info=True)
                    assert info.direct and (y - layer(x)).abs().max().item() <= 1e-5
                before = _stages(spec.name, pool)
                t = time.perf_counter()
                lat = latency_ms(lambda h=handle: h.forward(x), n, 0)
                wall = time.perf_counter() - t
                after = _stages(spec.name, pool)
                kind = "direct" if via == "direct" else "router"
                stages = per_batch_ms(before[kind], after[kind])
                out[via] = {**lat, **stages, "mean": wall / n * 1e3}
    finally:
        pool.shutdown()
    return out


def _stages(name: str, pool) -> dict:
    """Seconds per stage so far: the routers' (per batch), and the handle's own direct
    requests' (per request)."""
    view = pool._view()
    direct = {k: view.stage_s.get(k, 0.0) for k in ("route", "dispatch", "combine")}
    return {"router": router_stages(name), "direct": {**direct, "batches": view.stage_s["n"]}}


def report(inproc: float, compute: float, floors: dict, echo: float, rows: dict) -> None:
    print(
        f"\n16-token request, p50 ms (stages are means per batch: a router's, or the caller's "
        f"own for the direct path), {inproc=:.2f}"
    )
    paths = ("direct", "router", "client")
    head = f"{'stage':<44}" + "".join(f"{t[:4] + ' ' + v:>13}" for t in rows for v in paths)
    print(head)

    def line(label: str, get, stage: bool = False) -> None:
        cells = "".join(
            f"{'-':>13}" if stage and v == "client" else f"{get(rows[t][v]):>13.2f}"
            for t in rows
            for v in paths
        )  # a client's stages run in the gateway, out of sight here
        print(f"{label:<44}{cells}")

    line("total (mean)", lambda r: r["mean"])
    line("total p50", lambda r: r["p50"])
    line("total p99", lambda r: r["p99"])
    line("  gate (route)", lambda r: r["route"], True)
    line("  dispatch (shard calls + compute)", lambda r: r["dispatch"], True)
    line(f"    of it: slowest shard's compute {compute:.2f}", lambda r: compute)
    line("  combine", lambda r: r["combine"], True)
    line("  the rest: hop to the router, queue, reply", lambda r: r["mean"] - _stage_sum(r), True)
    line("total p50 - in-process layer", lambda r: r["p50"] - inproc)
    print(
        f"\nfloors in this run: Ray actor call {floors['actor_call']:.2f} ms, fan-out to "
        f"{floors['shards']} actors {floors['fan_out']:.2f} ms, gRPC unary echo {echo:.2f} ms; "
        f"in-process MoELayer {inproc:.2f} ms"
    )
    d = rows["grpc"]["direct"]
    floor = d["route"] + floors["grpc_fan_out"] + d["combine"]
    print(
        f"the direct path's floor over gRPC: its gate {d['route']:.2f} + a gRPC fan-out to 2 "
        f"server processes that each busy-wait the shards' compute "
        f"{floors['grpc_fan_out']:.2f} + its combine {d['combine']:.2f} = {floor:.2f} ms, "
        f"in-process + {floor - inproc:.2f} ms (bench_grpc_fanout.py)"
    )
    for t in rows:
        h, r, c = rows[t]["direct"], rows[t]["router"], rows[t]["client"]
        print(
            f"{t}: handle p50 = in-process + {h['p50'] - inproc:.2f} ms (target +1.5; through "
            f"a router + {r['p50'] - inproc:.2f}), p99/p50 {h['p99'] / h['p50']:.2f} (target "
            f"<= 2); client p50 = in-process + {c['p50'] - inproc:.2f} ms (target +2.5)"
        )


def _stage_sum(r: dict) -> float:
    return r["route"] + r["dispatch"] + r["combine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mixtral-tiny")
    ap.add_argument("--n", type=int, default=300, help="requests per path")
    args = ap.parse_args()
    base = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{args.config}.yaml")
    layer = MoELayer(base).eval()
    x = torch.randn(16, base.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inproc = median_time(lambda: layer(x), 200) * 1e3
    compute = shard_compute_ms(base, layer, x, 200)
    fan_out = grpc_fan_out("sync", compute, args.n)["two"][0]
    ray.init(include_dashboard=False, log_to_driver=False, namespace="raymoe")
    floors = {**ray_floors(base.shards.count, x.numpy(), args.n), "shards": base.shards.count}
    floors["grpc_fan_out"] = fan_out
    echo = grpc_echo_ms(x.numel() * 4)
    rows = {t: profile(base, t, x, args.n) for t in ("object_store", "grpc")}
    report(inproc, compute, floors, echo, rows)
    ray.shutdown()


if __name__ == "__main__":
    main()
