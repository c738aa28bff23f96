"""Where a 16-token request's time goes: a profile per stage, over both router -> shard
transports and through the gateway, beside the in-process layer and the floors measured in
the same run (a Ray actor call, a fan-out to the pool's shards, a gRPC unary echo).

For each transport one pool (``--config``, mixtral-tiny) is served with its gateway on
loopback and 16-token requests go one at a time through ``PoolHandle`` and ``raymoe.Client``.
The routers report the seconds of their stages (gate, dispatch, combine) per batch; the
shards' expert compute is timed in process on the very sub-batches the router sends them
(the dispatch stage includes it). What is left is the hop: the call to the router, its
queue, and the reply. Last, per transport, the request with no router at all: the caller
gates it, calls the shards itself and combines (the floor of a direct fast path).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_latency.py [--n 300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import grpc
import numpy as np
import ray
import torch
from _timing import latency_ms, median_time
from bench_gateway import grpc_echo_ms

import raymoe
from raymoe import MoELayer, PoolSpec
from raymoe._private.data.dispatch import DispatchTable, combine, places_digest, split_by_shard
from raymoe._private.data.shard import ExpertShard
from raymoe._private.data.wire import from_tensor, to_tensor
from raymoe.placement import initial
from raymoe.v1 import shard_pb2, shard_pb2_grpc

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


def direct(spec: PoolSpec, layer: MoELayer, x: torch.Tensor, n: int) -> dict:
    """p50/p99 (ms) of the request with no router: the caller gates it itself, calls the
    pool's shards over the pool's transport and combines (a fast path's floor; the output
    must equal the layer's)."""
    shards = [ray.get_actor(f"{spec.name}:shard:{i}") for i in range(spec.shards.count)]
    placement = initial(spec.num_experts, spec.shards.count, replicas=spec.shards.replicas)
    table = DispatchTable(placement)
    if spec.shards.transport == "grpc":
        stubs = [
            shard_pb2_grpc.ExpertShardServiceStub(grpc.insecure_channel(e))
            for e in ray.get([s.endpoint.remote() for s in shards])
        ]

        def send(sub, args):
            req = shard_pb2.ComputeRequest(
                x=to_tensor(args[0]),
                local_ids=to_tensor(args[1]),
                weights=to_tensor(args[2]),
                places_digest=args[3],
            )
            return stubs[sub.shard].Compute.future(req)

        def wait(calls):
            return [from_tensor(c.result().y, "y") for c in calls]
    else:

        def send(sub, args):
            return shards[sub.shard].compute.remote(*args)

        wait = ray.get

    @torch.no_grad()
    def once() -> torch.Tensor:
        routes = layer.route(x, x)
        subs = split_by_shard(routes.ids, routes.weights, table)
        calls = [
            send(
                s,
                (
                    x[s.tokens].numpy(),
                    s.local_ids.numpy(),
                    s.weights.float().numpy(),
                    places_digest(s.local_ids, s.expert_ids),
                ),
            )
            for s in subs
        ]
        parts = [torch.from_numpy(np.asarray(p)) for p in wait(calls)]
        return combine(x.shape[0], spec.d_model, list(zip(subs, parts, strict=True)), x)

    with torch.no_grad():
        err = float((once() - layer(x)).abs().max())
    assert err <= 1e-5, f"direct path off the layer by {err}"
    return latency_ms(once, n)


def profile(base: PoolSpec, transport: str, x: torch.Tensor, n: int) -> dict:
    data = base.model_dump(mode="json")
    data["name"] = f"lat-{transport}"
    data["shards"]["transport"] = transport
    data["gateway"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    spec = PoolSpec.from_dict(data)
    pool = raymoe.serve(spec)
    out = {}
    try:
        (endpoint,) = pool.gateways()
        with raymoe.Client(endpoint) as client:
            for via, call in (("handle", pool.forward), ("client", client.forward)):
                latency_ms(lambda call=call: call(x), 50, 0)  # warm-up
                before = router_stages(spec.name)
                t = time.perf_counter()
                lat = latency_ms(lambda call=call: call(x), n, 0)
                wall = time.perf_counter() - t
                after = router_stages(spec.name)
                out[via] = {**lat, **per_batch_ms(before, after), "mean": wall / n * 1e3}
        out["direct"] = direct(spec, MoELayer(spec).eval(), x, n)
    finally:
        pool.shutdown()
    return out


def report(inproc: float, compute: float, floors: dict, echo: float, rows: dict) -> None:
    print(f"\n16-token request, p50 ms (the router stages are means per batch), {inproc=:.2f}")
    paths = ("handle", "client")
    head = f"{'stage':<44}" + "".join(f"{t + ' ' + v:>20}" for t in rows for v in paths)
    print(head)

    def line(label: str, get) -> None:
        cells = "".join(f"{get(rows[t][v]):>20.2f}" for t in rows for v in paths)
        print(f"{label:<44}{cells}")

    line("total (mean)", lambda r: r["mean"])
    line("total p50", lambda r: r["p50"])
    line("total p99", lambda r: r["p99"])
    line("  router: gate (route)", lambda r: r["route"])
    line("  router: dispatch (shard calls + compute)", lambda r: r["dispatch"])
    line(f"    of it: slowest shard's compute {compute:.2f}", lambda r: compute)
    line("  router: combine", lambda r: r["combine"])
    line("  the rest: hop to router, queue, reply", lambda r: r["mean"] - _router(r))
    line("total p50 - in-process layer", lambda r: r["p50"] - inproc)
    print(
        f"\nfloors in this run: Ray actor call {floors['actor_call']:.2f} ms, fan-out to "
        f"{floors['shards']} actors {floors['fan_out']:.2f} ms, gRPC unary echo {echo:.2f} ms; "
        f"in-process MoELayer {inproc:.2f} ms"
    )
    for t in rows:
        d = rows[t]["direct"]
        print(
            f"{t}: no router (the caller gates and calls the shards itself): p50 "
            f"{d['p50']:.2f} ms = in-process + {d['p50'] - inproc:.2f} ms, p99 {d['p99']:.2f} ms"
        )
    for t in rows:
        h = rows[t]["handle"]
        print(
            f"{t}: handle p50 = in-process + {h['p50'] - inproc:.2f} ms (target +1.5), "
            f"p99/p50 {h['p99'] / h['p50']:.2f} (target <= 2); client p50 = in-process + "
            f"{rows[t]['client']['p50'] - inproc:.2f} ms (target +2.5)"
        )


def _router(r: dict) -> float:
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
    ray.init(include_dashboard=False, log_to_driver=False, namespace="raymoe")
    floors = {**ray_floors(base.shards.count, x.numpy(), args.n), "shards": base.shards.count}
    echo = grpc_echo_ms(x.numel() * 4)
    rows = {t: profile(base, t, x, args.n) for t in ("object_store", "grpc")}
    report(inproc, compute, floors, echo, rows)
    ray.shutdown()


if __name__ == "__main__":
    main()
