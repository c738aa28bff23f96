"""The floor under a small request's direct path over gRPC: a caller sends one message to
each of two server processes at once and waits for both, as the direct path does with a
16-token request's two sub-batches. The servers busy-wait ``--work-ms`` per call (a shard's
compute of its sub-batch: ~0.6 ms for mixtral-tiny) behind gRPC's sync server (one worker
thread, as the shards run it), or with its asyncio server, for comparison.

Prints p50/p99 of one call and of the fan-out to two, with no work and with ``--work-ms``:
the served hop can be no faster than the fan-out, plus the caller's gate, split and combine.

    .venv/bin/python benchmarks/bench_grpc_fanout.py [--work-ms 0.6]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from concurrent import futures

import grpc
from _timing import latency_ms

REQUEST = b"x" * 40_000  # a 16-token sub-batch: x [16, 256] fp32, ids and weights [16, 8]
REPLY = b"y" * 16_384  # [16, 256] fp32
SERVICE, METHOD = "floor", "Call"


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def _handlers(handler):
    method = grpc.unary_unary_rpc_method_handler(handler)
    return (grpc.method_handlers_generic_handler(SERVICE, {METHOD: method}),)


def _sync_server(ports: mp.Queue, work_ms: float) -> None:
    def handler(request, context):
        _busy(work_ms)
        return REPLY

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers(_handlers(handler))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _aio_server(ports: mp.Queue, work_ms: float) -> None:
    async def handler(request, context):
        _busy(work_ms)
        return REPLY

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(_handlers(handler))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def measure(kind: str, work_ms: float, n: int) -> dict:
    ctx = mp.get_context("spawn")  # a caller with threads (torch's, Ray's) forks badly
    ports = ctx.Queue()
    target = _sync_server if kind == "sync" else _aio_server
    procs = [ctx.Process(target=target, args=(ports, work_ms), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        channels = [grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=30)}") for _ in procs]
        calls = [c.unary_unary(f"/{SERVICE}/{METHOD}") for c in channels]

        def fan_out():
            pending = [call.future(REQUEST) for call in calls]
            for f in pending:
                f.result()

        out = {}
        for name, fn in [("one", lambda: calls[0](REQUEST)), ("two", fan_out)]:
            lat = latency_ms(fn, n, warmup=50)
            out[name] = (lat["p50"], lat["p99"])
        for c in channels:
            c.close()
        return out
    finally:
        for p in procs:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-ms", type=float, default=0.6)
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    print("ms, p50 / p99     one server     fan-out to two")
    for kind in ("sync", "aio"):
        for work in (0.0, args.work_ms):
            r = measure(kind, work, args.n)
            print(
                f"{kind:>4} server, work {work:.2f}  {r['one'][0]:5.2f} / {r['one'][1]:5.2f}"
                f"    {r['two'][0]:5.2f} / {r['two'][1]:5.2f}"
            )


if __name__ == "__main__":
    main()
