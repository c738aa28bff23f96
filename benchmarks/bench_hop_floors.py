"""What a 16-token request would cost with no router, over plain Ray calls and over a Ray
Compiled Graph (shared-memory channels), beside the in-process layer, in one run.

The caller gates the request, splits it by shard and sends each of two shard actors (each an
``ExpertShard`` holding its experts, one torch thread as in a pool) its sub-batch, then
combines; the outputs must equal ``MoELayer``'s. This is the floor of a fast path that skips
the router (issue 13 weighs it): whatever such a path adds (versions, retries) comes on top.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hop_floors.py [--n 300]
    OMP_NUM_THREADS=1 PYTHONPATH=. ...   # the caller's torch on one thread: its idle OpenMP
                                         # threads then do not spin on the shards' cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import ray
import torch
from _timing import latency_ms
from ray.dag import InputNode, MultiOutputNode

from raymoe import MoELayer, PoolSpec
from raymoe._private.data.dispatch import DispatchTable, combine, places_digest, split_by_shard
from raymoe._private.data.shard import ExpertShard
from raymoe.placement import initial

ROOT = Path(__file__).resolve().parents[1]


@ray.remote(num_cpus=1)
class Shard:
    def __init__(self, spec: PoolSpec, n: int, experts: np.ndarray):
        torch.set_num_threads(spec.shards.shard_threads)
        self.shard = ExpertShard(spec, n, experts)

    def compute(self, args):
        return None if args is None else self.shard.compute(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mixtral-tiny")
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    spec = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{args.config}.yaml")
    N = spec.shards.count
    placement = initial(spec.num_experts, N)
    table = DispatchTable(placement)
    layer = MoELayer(spec).eval()
    x = torch.randn(16, spec.d_model, generator=torch.Generator().manual_seed(0))
    ray.init(num_cpus=2 * N, include_dashboard=False, log_to_driver=False)
    plain = [Shard.remote(spec, n, placement.shard_experts(n)) for n in range(N)]
    chan = [Shard.remote(spec, n, placement.shard_experts(n)) for n in range(N)]
    with InputNode() as inp:
        dag = MultiOutputNode([chan[n].compute.bind(inp[n]) for n in range(N)])
    graph = dag.experimental_compile()

    def split():
        routes = layer.route(x, x)
        subs = split_by_shard(routes.ids, routes.weights, table)
        per = [None] * N
        for s in subs:
            digest = places_digest(s.local_ids, s.expert_ids)
            per[s.shard] = (x[s.tokens].numpy(), s.local_ids.numpy(), s.weights.numpy(), digest)
        return subs, per

    def done(subs, outs):
        parts = [(s, torch.from_numpy(np.asarray(outs[s.shard]))) for s in subs]
        return combine(x.shape[0], spec.d_model, parts, x)

    def over_calls():
        subs, per = split()
        return done(subs, ray.get([h.compute.remote(a) for h, a in zip(plain, per, strict=True)]))

    def over_graph():
        subs, per = split()
        return done(subs, ray.get(graph.execute(*per)))

    with torch.no_grad():
        want = layer(x)
        for fn in (over_calls, over_graph):
            err = float((fn() - want).abs().max())
            assert err <= 1e-5, f"{fn.__name__} off the layer by {err}"
        rows = {
            "in-process MoELayer": latency_ms(lambda: layer(x), args.n),
            "no router, Ray calls": latency_ms(over_calls, args.n),
            "no router, compiled graph": latency_ms(over_graph, args.n),
        }
    graph.teardown()
    ray.shutdown()
    inproc = rows["in-process MoELayer"]["p50"]
    print(f"{args.config}, 16 tokens, {N} shards, torch threads here {torch.get_num_threads()}")
    for name, r in rows.items():
        over = r["p50"] - inproc
        print(f"{name:<28} p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  (+{over:.2f})")


if __name__ == "__main__":
    main()
