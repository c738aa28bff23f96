"""The gRPC gateway vs the in-cluster PoolHandle, for the same pool, side by side in one run.

For each router -> shard transport (Ray object store, gRPC) one pool is served with its
gateway on loopback, and the same requests go through:
  - ``PoolHandle`` (a Ray actor call to a router), and
  - ``raymoe.Client`` (gRPC to the gateway, which calls the router);
measuring tokens/s at 1k and 8k-token batches (one request at a time, and 4 client threads),
and the latency p50/p99 of 16-token requests. The in-process MoELayer is the reference, and
a bare gRPC unary echo on loopback (the floor under the extra hop) is measured in the same run.
Prints ratios (client / handle); writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch
from _timing import latency_ms, median_time, threaded

import raymoe
from raymoe import MoELayer, PoolSpec

ROOT = Path(__file__).resolve().parents[1]


def grpc_echo_ms(nbytes: int, n: int = 300) -> float:
    """p50 of a unary gRPC call carrying ``nbytes`` both ways on loopback."""
    opts = [
        ("grpc.max_receive_message_length", 2 * nbytes + (1 << 20)),
        ("grpc.max_send_message_length", 2 * nbytes + (1 << 20)),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(2), options=opts)
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("e", {"E": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    call = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts).unary_unary("/e/E")
    payload = b"\0" * nbytes
    lat = []
    for i in range(n + 20):
        t = time.perf_counter()
        call(payload)
        if i >= 20:
            lat.append((time.perf_counter() - t) * 1000)
    server.stop(0)
    return float(np.percentile(lat, 50))


def measure(call, layer, xs, sizes, reps) -> dict:
    out = {"rows": []}
    for T in sizes:
        x = xs[T]
        with torch.no_grad():
            err = float((call(x) - layer(x)).abs().max())
        seq = T / median_time(lambda x=x: call(x), reps)
        par = threaded(lambda x=x: call(x), 4, reps, T)
        out["rows"].append(
            {"tokens": T, "seq_tok_s": seq, "threads4_tok_s": par, "max_abs_err": err}
        )
    out["latency16_ms"] = latency_ms(lambda: call(xs[16]))
    return out


def bench(config: str, sizes: list[int], reps: int) -> list[dict]:
    base = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{config}.yaml")
    layer = MoELayer(base).eval()
    g = torch.Generator().manual_seed(0)
    xs = {T: torch.randn(T, base.d_model, generator=g) for T in [16, *sizes]}
    with torch.no_grad():
        local = {T: T / median_time(lambda T=T: layer(xs[T]), reps) for T in sizes}
    results = []
    for transport in ("object_store", "grpc"):
        data = base.model_dump(mode="json")
        data["shards"]["transport"] = transport
        data["gateway"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
        spec = PoolSpec.from_dict(data)
        print(f"[{config}/{transport}] serving ...", flush=True)
        pool = raymoe.serve(spec)
        try:
            (endpoint,) = pool.gateways()
            with raymoe.Client(endpoint) as client:
                for name, call in (("handle", pool.forward), ("client", client.forward)):
                    r = measure(call, layer, xs, sizes, reps)
                    r.update(config=config, transport=transport, via=name, inprocess=local)
                    results.append(r)
                    _line(r)
        finally:
            pool.shutdown()
    return results


def _line(r: dict) -> None:
    rows = "  ".join(
        f"{row['tokens']}: {row['seq_tok_s']:,.0f} seq / {row['threads4_tok_s']:,.0f} x4 tok/s"
        for row in r["rows"]
    )
    lat = r["latency16_ms"]
    print(
        f"[{r['config']}/{r['transport']}] {r['via']:<6} {rows}  16-token p50 "
        f"{lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms  max err "
        f"{max(row['max_abs_err'] for row in r['rows']):.1e}",
        flush=True,
    )


def report(results: list[dict], echo: dict) -> None:
    print(
        f"\nreference: bare gRPC unary echo on loopback p50 {echo['16']:.2f} ms (16 tokens), "
        f"{echo['8192']:.2f} ms (8k tokens)\n"
    )
    print(
        f"{'transport':<14}{'tokens':>7}{'in-proc':>10}{'handle':>10}{'client':>10}"
        f"{'client/handle':>15}{'x4 handle':>11}{'x4 client':>11}{'x4 ratio':>10}"
    )
    by = {(r["transport"], r["via"]): r for r in results}
    for transport in ("object_store", "grpc"):
        h, c = by[(transport, "handle")], by[(transport, "client")]
        for rh, rc in zip(h["rows"], c["rows"], strict=True):
            T = rh["tokens"]
            print(
                f"{transport:<14}{T:>7}{h['inprocess'][T]:>10,.0f}{rh['seq_tok_s']:>10,.0f}"
                f"{rc['seq_tok_s']:>10,.0f}{rc['seq_tok_s'] / rh['seq_tok_s']:>15.2f}"
                f"{rh['threads4_tok_s']:>11,.0f}{rc['threads4_tok_s']:>11,.0f}"
                f"{rc['threads4_tok_s'] / rh['threads4_tok_s']:>10.2f}"
            )
    print()
    for transport in ("object_store", "grpc"):
        h, c = by[(transport, "handle")]["latency16_ms"], by[(transport, "client")]["latency16_ms"]
        print(
            f"{transport:<14}16-token p50: handle {h['p50']:.2f} ms, client {c['p50']:.2f} ms "
            f"(+{c['p50'] - h['p50']:.2f} ms for the gateway hop); p99 {h['p99']:.2f} vs "
            f"{c['p99']:.2f} ms"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mixtral-tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway.json"))
    args = p.parse_args()
    spec = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{args.config}.yaml")
    echo = {str(T): grpc_echo_ms(T * spec.d_model * 4) for T in (16, 8192)}
    results = bench(args.config, args.sizes, args.reps)
    report(results, echo)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"echo_ms": echo, "results": results}, indent=2))


if __name__ == "__main__":
    main()
