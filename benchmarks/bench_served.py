"""Served pool vs in-process MoELayer, side by side in one run, on a local Ray cluster.

What is compared, with the concurrency stated on both sides:
  (a) throughput at 1k..16k-token batches, like for like: "sequential" is one request at a
      time on both sides (one in-process ``MoELayer`` call vs one ``pool.forward`` call);
      "pipelined" is two requests in flight on both sides (two threads calling the layer vs
      two outstanding ``forward_async`` refs). The served output is checked against the
      layer (max abs error). The target ratio (served/in-process at 8k tokens) is the
      sequential one: the same work, one request in flight, both sides;
  (b) latency p50/p99 of a 16-token request on an idle pool, beside the in-process time;
  (c) many small clients: 32 threads sending 16-token requests at once vs one client, with
      the routers' mean batch size *during that phase* (tokens sent / batches formed, from
      the difference of two readings of the batch counter, so the earlier 1k-16k-token
      batches do not count).
Each pool runs with both router -> shard transports (Ray object store and gRPC), side by side.
References measured in the same run: matmul GFLOP/s, and the round trip of plain Ray actors
(the floor under any served request). Prints ratios and whether each target
of the served-pool issue is met (and by how much it is missed); writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch
from _timing import latency_ms, median_time, threaded

import raymoe
from raymoe import MoELayer, PoolSpec

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"mixtral-tiny": 0.9, "peer-1m": 0.8}  # served/in-process at 8k tokens
P50_TARGET_MS = 5.0


def matmul_gflops() -> float:
    a = torch.randn(2048, 2048)
    return 2 * 2048**3 / median_time(lambda: a @ a, 5) / 1e9


def served_throughput(pool, x: np.ndarray, n: int, inflight: int) -> float:
    """tokens/s of ``n`` requests of ``x`` with at most ``inflight`` outstanding."""
    pool.forward(x)
    t = time.perf_counter()
    pending = []
    for _ in range(n):
        if len(pending) >= inflight:
            ray.get(pending.pop(0))
        pending.append(pool.forward_async(x))
    ray.get(pending)
    return n * len(x) / (time.perf_counter() - t)


def clients(pool, d: int, threads: int, requests: int, tokens: int = 16) -> tuple[float, float]:
    """(tokens/s, mean batch tokens formed by the routers during this phase)."""
    x = np.random.default_rng(0).standard_normal((tokens, d)).astype(np.float32)
    before = _batches(pool)
    tps = threaded(lambda: pool.forward(x), threads, requests, tokens)
    formed = max(_batches(pool) - before, 1)
    return tps, threads * requests * tokens / formed


def _batches(pool) -> int:
    s = pool.stats()
    counters = s["counters"] if isinstance(s, dict) else s.counters
    return int(counters.get("batches", 0))


def inprocess_pipelined(layer, x: torch.Tensor, n: int) -> float:
    """tokens/s of ``n`` in-process calls from two threads (two in flight, like the pool)."""
    with torch.no_grad():
        return threaded(lambda: layer(x), 2, max(1, n // 2), len(x))


def ray_floor() -> dict:
    """Round trips of plain actors (16 KB numpy), the floor under any served request: one hop
    (driver -> actor) and two hops with a fan-out to two actors (driver -> router -> shards);
    and one hop of an 8k-token request of d = 256 (8 MB in, 8 MB back), which a served 8k
    request makes once to its router and about once more to its shards."""

    class Echo:
        def f(self, x):
            return x

    class Fan:
        def __init__(self, shards):
            self.shards = shards

        async def f(self, x):
            return (await asyncio.gather(*(s.f.remote(x) for s in self.shards)))[0]

    shards = [ray.remote(num_cpus=0)(Echo).remote() for _ in range(2)]
    fan = ray.remote(num_cpus=0)(Fan).remote(shards)
    x = np.zeros((16, 256), np.float32)
    out = {}
    for name, h in [("one_hop_ms", shards[0]), ("two_hops_ms", fan)]:
        out[name] = latency_ms(lambda h=h: ray.get(h.f.remote(x)))["p50"]
    big = np.zeros((8192, 256), np.float32)
    out["one_hop_8k_ms"] = median_time(lambda: ray.get(shards[0].f.remote(big)), 15) * 1e3
    for h in [fan, *shards]:
        ray.kill(h)
    return out


def bench(name: str, sizes: list[int], reps: int, transports: list[str]) -> list[dict]:
    base = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{name}.yaml")
    print(f"[{name}] building the in-process layer ...", flush=True)
    layer = MoELayer(base).eval()
    g = torch.Generator().manual_seed(0)
    xs = {T: torch.randn(T, base.d_model, generator=g) for T in [16, *sizes]}
    local, local_pipe = {}, {}
    with torch.no_grad():
        for T in [16, *sizes]:
            local[T] = median_time(lambda T=T: layer(xs[T]), reps)
    for T in sizes:
        local_pipe[T] = inprocess_pipelined(layer, xs[T], 2 * reps)
    weights = {k: v.numpy() for k, v in layer.state_dict().items()}
    out = []
    for transport in transports:
        data = base.model_dump(mode="json")
        data["shards"]["transport"] = transport
        spec = PoolSpec.from_dict(data)
        print(f"[{name}] serving the pool ({transport}) ...", flush=True)
        pool = raymoe.serve(spec, weights=weights)
        try:
            out.append(_measure(pool, spec, layer, xs, (local, local_pipe), sizes, reps, transport))
        finally:
            pool.shutdown()
    return out


def _measure(pool, spec, layer, xs, inproc, sizes, reps, transport) -> dict:
    tag = f"{spec.name}/{transport}"
    local, local_pipe = inproc
    rows = []
    for T in sizes:
        x = xs[T].numpy()
        with torch.no_grad():
            err = float(np.abs(pool.forward(x) - layer(xs[T]).numpy()).max())
        seq = median_time(lambda x=x: pool.forward(x), reps)
        pipe = served_throughput(pool, x, 2 * reps, inflight=2)
        rows.append(
            {
                "tokens": T,
                "inprocess_tok_s": T / local[T],
                "inprocess_pipelined_tok_s": local_pipe[T],
                "served_seq_tok_s": T / seq,
                "served_pipelined_tok_s": pipe,
                "max_abs_err": err,
            }
        )
        print(
            f"[{tag}] {T:>6} tokens  seq: in-process {T / local[T]:>9,.0f} served "
            f"{T / seq:>9,.0f}  2 in flight: in-process {local_pipe[T]:>9,.0f} served "
            f"{pipe:>9,.0f} tok/s  err {err:.1e}",
            flush=True,
        )
    x16 = xs[16].numpy()
    lat = latency_ms(lambda: pool.forward(x16))
    one, _ = clients(pool, spec.d_model, 1, 100)
    many, mean_batch = clients(pool, spec.d_model, 32, 20)
    return {
        "config": spec.name,
        "transport": transport,
        "rows": rows,
        "latency16_ms": {**lat, "inprocess": local[16] * 1000},
        "clients": {"one_tok_s": one, "many_tok_s": many, "mean_batch_tokens": mean_batch},
    }


def report(results: list[dict], gflops: float, floor: dict) -> None:
    print(
        f"\nreferences: fp32 matmul {gflops:.0f} GFLOP/s; plain Ray actor round trip "
        f"{floor['one_hop_ms']:.2f} ms, two hops with fan-out to 2 {floor['two_hops_ms']:.2f} ms"
        f" (p50, 16 KB); one hop of 8 MB in and 8 MB back {floor['one_hop_8k_ms']:.1f} ms\n"
    )
    print("tokens/s; 'seq' = one request in flight on both sides, '2 in flight' = two on both")
    print(
        f"{'config':<14}{'transport':<14}{'tokens':>7}{'in-proc seq':>12}{'served seq':>11}"
        f"{'ratio':>7}{'in-proc 2':>11}{'served 2':>10}{'ratio':>7}{'max err':>9}"
    )
    for r in results:
        for row in r["rows"]:
            base, base2 = row["inprocess_tok_s"], row["inprocess_pipelined_tok_s"]
            seq, pipe = row["served_seq_tok_s"], row["served_pipelined_tok_s"]
            print(
                f"{r['config']:<14}{r['transport']:<14}{row['tokens']:>7}{base:>12,.0f}"
                f"{seq:>11,.0f}{seq / base:>7.2f}{base2:>11,.0f}{pipe:>10,.0f}"
                f"{pipe / base2:>7.2f}{row['max_abs_err']:>9.1e}"
            )
    print()
    for r in results:
        lat, cl = r["latency16_ms"], r["clients"]
        print(
            f"{r['config']:<14}{r['transport']:<14}16-token p50 {lat['p50']:.2f} ms, p99 "
            f"{lat['p99']:.2f} ms (in-process {lat['inprocess']:.2f} ms); 32 clients "
            f"{cl['many_tok_s']:,.0f} tok/s vs 1 client {cl['one_tok_s']:,.0f} "
            f"({cl['many_tok_s'] / cl['one_tok_s']:.1f}x), mean batch "
            f"{cl['mean_batch_tokens'] or 0:.0f} tokens"
        )
    print("\ntargets:")
    for r in results:
        tag = f"{r['config']} ({r['transport']})"
        at8k = next((row for row in r["rows"] if row["tokens"] == 8192), None)
        if r["config"] in TARGETS and at8k:
            ratio = at8k["served_seq_tok_s"] / at8k["inprocess_tok_s"]
            _verdict(
                f"{tag} served/in-process at 8k tokens, one in flight each",
                ratio,
                TARGETS[r["config"]],
            )
            ratio = at8k["served_pipelined_tok_s"] / at8k["inprocess_pipelined_tok_s"]
            print(f"  {tag} served/in-process at 8k tokens, two in flight each: {ratio:.2f}")
        p50 = r["latency16_ms"]["p50"]
        ok = p50 <= P50_TARGET_MS
        print(
            f"  {tag} 16-token p50 {p50:.2f} ms <= {P50_TARGET_MS} ms: "
            + ("met" if ok else f"MISSED by {p50 - P50_TARGET_MS:.2f} ms")
        )


def _verdict(what: str, got: float, want: float) -> None:
    miss = "" if got >= want else f"; MISSED by {want - got:.2f} ({got / want:.0%} of target)"
    print(f"  {what}: {got:.2f} (target >= {want}){miss or ' met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["mixtral-tiny", "peer-1m"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 8192, 16384])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--transports", nargs="+", default=["object_store", "grpc"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "served.json")
    args = ap.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False, namespace="raymoe")
    gflops, floor = matmul_gflops(), ray_floor()
    results = [
        r for name in args.configs for r in bench(name, args.sizes, args.reps, args.transports)
    ]
    report(results, gflops, floor)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"matmul_gflops": gflops, "ray_floor": floor, "results": results}
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
