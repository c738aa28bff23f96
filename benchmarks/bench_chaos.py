"""Chaos: a served pool under 8 clients while its processes are SIGKILLed, as a node fault
would kill them, and its Redis is stopped for 10 s.

One local Ray cluster, started here; a mixtral-tiny-style pool (16 experts, 4 shards, every
expert on 2 shards, 2 routers, one warm spare shard, a gRPC gateway, Redis as its metadata
store when ``redis-server`` is installed). Over ``--seconds`` (60): a shard every 5 s (round
robin), a router, the controller and the gateway once each, Redis down for 10 s; one admin change
(``replicate``: one more replica of expert 0) after the controller came back. Prints failed
requests, the worst error vs MoELayer, latency, recovery time per kill (death -> every
expert served again: a request routed to every expert succeeds; and death -> that process
serves again), and whether the pool's experts and placement are those before plus the
admin change.

    .venv/bin/python benchmarks/bench_chaos.py [--seconds 60] [--replicas 2] [--spares 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import numpy as np
import ray
import torch

import raymoe
from raymoe import MoELayer, PoolSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self):
        self.port, self.dir = free_port(), tempfile.mkdtemp(prefix="chaos-redis-")
        self.proc = None

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--dir", self.dir]
        args += ["--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def pid_of(name: str) -> int:
    for _ in range(600):  # while it restarts (killed a moment ago)
        try:
            actor = ray.get_actor(name, namespace="raymoe")
            return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        except ray.exceptions.RayActorError:
            time.sleep(0.05)
    raise TimeoutError(f"{name} did not come back")


def serving(name: str) -> bool:
    """Whether the actor ``name`` answers and serves (shards and routers: ready)."""
    actor = ray.get_actor(name, namespace="raymoe")
    role = name.split(":")[1]
    method = {"shard": "status", "router": "describe"}.get(role)
    if method is None:  # controller, gateway: answering is serving
        ray.get(actor.__ray_call__.remote(lambda self: True), timeout=1)
        return True
    return bool(ray.get(getattr(actor, method).remote(), timeout=1)["ready"])


def kill(name: str, kills: list, probe=None) -> None:
    """SIGKILL the process of ``name``; record the time until every expert is served again
    (``probe``: a request routed to every expert succeeds) and until the process itself
    serves again."""
    pid = pid_of(name)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    served = None
    if probe is not None:
        probe()
        served = time.monotonic() - t0
    time.sleep(0.05)
    while time.monotonic() - t0 < 120:  # bounded: a process that never came back is reported
        try:
            if pid_of(name) != pid and serving(name):
                break
        except Exception:
            pass
        time.sleep(0.05)
    kills.append((name, served, time.monotonic() - t0, t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--spares", type=int, default=1, help="warm spare shards (shards.spares)")
    args = ap.parse_args()
    redis = Redis() if shutil.which("redis-server") else None
    if redis:
        redis.start()
        os.environ["RAYMOE_REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
    os.environ["RAYMOE_WEIGHTS_DIR"] = tempfile.mkdtemp(prefix="chaos-weights-")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="raymoe")
    E, S = 16, 4
    spec = PoolSpec.from_dict(
        {
            "name": "chaos",
            "d_model": 64,
            "experts": {"kind": "ffn", "num_experts": E, "hidden": 128},
            "routing": {"kind": "topk", "k": 2},
            "shards": {
                "count": S,
                "routers": 2,
                "replicas": {e: args.replicas for e in range(E)} if args.replicas > 1 else {},
                "spares": args.spares,
            },
            "control": {"auto_rebalance": False},
            "gateway": {"enabled": True, "host": "127.0.0.1", "port": 0},
        }
    )
    layer = MoELayer(spec).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pool = raymoe.serve(spec, weights=layer.state_dict())
    before = pool.describe()
    stop, lat, failures, errs = threading.Event(), [], [], [0.0]

    def client(i):
        rng = np.random.default_rng(i)
        while not stop.is_set():
            x = rng.standard_normal((16, 64)).astype(np.float32)
            t = time.perf_counter()
            try:
                y = pool.forward(x, timeout_s=30)
                lat.append(time.perf_counter() - t)
                with torch.no_grad():
                    errs[0] = max(
                        errs[0], float(np.abs(y - layer(torch.from_numpy(x)).numpy()).max())
                    )
            except Exception as e:
                failures.append(repr(e)[:200])

    probe_x = np.random.default_rng(99).standard_normal((E, 64)).astype(np.float32)

    def every_expert():  # one token to each expert
        ids, w = np.arange(E).reshape(E, 1), np.ones((E, 1), np.float32)
        pool.forward(probe_x, expert_ids=ids, weights=w, timeout_s=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    kills: list = []
    t0 = time.monotonic()
    plan = [(5.0 * (i + 1), f"chaos:shard:{i % S}") for i in range(int(args.seconds // 5) - 1)]
    plan += [
        (7.5, "chaos:router:0"),
        (17.5, "chaos:controller:0"),
        (27.5, f"chaos:gateway:{_gw(pool)}"),
    ]
    plan.sort()
    admin, killers = None, []
    if redis:  # down from 35 s to 45 s, while the kills go on on their schedule

        def outage():
            time.sleep(max(0.0, 35.0 - (time.monotonic() - t0)))
            redis.stop()
            time.sleep(10)
            redis.start()

        threading.Thread(target=outage).start()
    for at, name in plan:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        probe = None if ":gateway:" in name else every_expert
        killers.append(threading.Thread(target=kill, args=(name, kills, probe)))
        killers[-1].start()
        if admin is None and at > 22.5:
            # after the controller came back: one more replica of expert 0
            admin = pool.replicate(0, args.replicas + 1)
    time.sleep(max(0.0, args.seconds - (time.monotonic() - t0)))
    stop.set()
    for t in threads + killers:  # the last kills: until their process serves again
        t.join()
    want_replicas = before.replicas + 1
    end = time.monotonic() + 60  # every shard back, the cover of the last ones dropped
    while (after := pool.describe()).replicas != want_replicas and time.monotonic() < end:
        time.sleep(0.5)
    same = after.experts == before.experts and after.removed == before.removed
    report(lat, failures, errs[0], kills, same and after.replicas == want_replicas, args)
    pool.shutdown()
    ray.shutdown()
    if redis:
        redis.stop()


def _gw(pool) -> str:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return next(n for n in names if n.startswith("chaos:gateway:")).split(":", 2)[2]


def report(lat, failures, err, kills, same, args) -> None:
    lat = np.array(lat) * 1e3
    print(f"{len(lat):,} requests, {len(failures)} failed; max abs error vs MoELayer {err:.1e}")
    for f in failures[:5]:
        print("  failed:", f)
    print(
        f"latency ms: p50 {np.percentile(lat, 50):.1f}  "
        f"p99 {np.percentile(lat, 99):.1f}  max {lat.max():.1f}"
    )
    print("kills, in order (every expert served again / the process serves again, s):")
    print(
        "  "
        + ", ".join(
            f"{n.split(':', 1)[1]} {e or 0:.2f}/{a:.2f}"
            for n, e, a, _ in sorted(kills, key=lambda k: k[3])
        )
    )
    served: dict[str, list[float]] = {}
    back: dict[str, list[float]] = {}
    for name, every, again, _ in kills:
        role = name.split(":")[1]
        back.setdefault(role, []).append(again)
        if every is not None:
            served.setdefault(role, []).append(every)
    for role in sorted(back):
        s, b = served.get(role), back[role]
        every = (
            f"every expert served again p50 {np.median(s):.2f} s, max {max(s):.2f} s; " if s else ""
        )
        print(
            f"after SIGKILL, {role} (x{len(b)}): {every}"
            f"the process serves again p50 {np.median(b):.2f} s, max {max(b):.2f} s"
        )
    shard = served.get("shard", [0.0])
    targets = {
        "0 failed requests": not failures,
        "errors <= 1e-5": err <= 1e-5,
        "experts and placement = before + admin change": same,
        "shard recovery (every expert served again) p50 < 1 s": float(np.median(shard)) < 1.0,
        "shard recovery (every expert served again) max < 2 s": max(shard) < 2.0,
    }
    for k, ok in targets.items():
        print(f"{'PASS' if ok else 'MISS'}  {k}  (replicas {args.replicas}, spares {args.spares})")


if __name__ == "__main__":
    main()
