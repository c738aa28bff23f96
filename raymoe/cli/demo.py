"""Run the demo on local Ray: a tiny MoE model served from its checkpoint, generating the
same tokens through the pool as in process, and the pool reacting to a shifted load (the
story, :mod:`raymoe.cli.story`); then the example pools driven, checked and timed."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

from raymoe.config import PoolSpec

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs"
DEMO_CONFIGS = ("mixtral-tiny", "peer-1m")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(DEMO_CONFIGS),
        help="example config names or YAML paths",
    )
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--tokens", type=int, default=512, help="tokens per request")
    p.add_argument("--no-story", action="store_true", help="only the example pools")
    p.set_defaults(run=run)


def resolve(name: str) -> PoolSpec:
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    return PoolSpec.from_yaml(path)


def run(args: argparse.Namespace) -> int:
    import raymoe

    specs = [resolve(n) for n in args.configs]  # fail on a bad spec before starting Ray
    story_rows = None
    if not args.no_story:
        from raymoe.cli import story

        if not ray.is_initialized():
            ray.init(namespace="raymoe", include_dashboard=False, log_to_driver=False)
        story_rows = story.run_story(lambda line: print(line, flush=True))
    rows = []
    for spec in specs:
        layout = f"{spec.shards.count} shards, {spec.shards.routers} router(s)"
        print(f"[{spec.name}] serving {spec.num_experts:,} {spec.experts.kind} experts on {layout}")
        pool = raymoe.serve(spec)
        try:
            rows.append((spec, *drive(pool, spec, args)))
        finally:
            pool.shutdown()
    print(
        f"\n{'pool':<14}{'experts':>11}{'shards':>7}{'tokens/s':>10}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'imbalance':>10}{'max err':>9}  pairs per shard"
    )
    for spec, tps, p50, p99, stats, err in rows:
        print(
            f"{spec.name:<14}{spec.num_experts:>11,}{spec.shards.count:>7}{tps:>10,.0f}"
            f"{p50:>8.1f}{p99:>8.1f}{stats.imbalance:>10.2f}{err:>9.1e}  "
            f"{list(stats.pairs_per_shard)}"
        )
    print("(imbalance: max/mean pairs per shard; max err: served vs in-process MoELayer)")
    if story_rows is not None:
        from raymoe.cli import story

        print("\nthe model pool under a shifting load (imbalance: the worst layer's max/mean)")
        print(story.table(story_rows))
        failed = sum(r.failed for r in story_rows)
        worst = max(r.max_error for r in story_rows)
        print(f"failed requests: {failed}; largest error vs in-process MoEStack: {worst:.1e}")
        if failed or worst > 1e-5:
            return 1
    return 0


def drive(pool, spec: PoolSpec, args):
    """Concurrent clients; returns (tokens/s, p50 ms, p99 ms, shard stats, max abs error)."""
    from raymoe.layer import MoELayer

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.tokens, spec.d_model, generator=g) for _ in range(args.clients)]
    pool.forward(xs[0])  # warm-up
    pool.stats()
    latencies: list[float] = []
    done = [0]
    lock = threading.Lock()
    total = args.clients * args.requests

    def client(x):
        for _ in range(args.requests):
            t = time.perf_counter()
            pool.forward(x)
            with lock:
                latencies.append(time.perf_counter() - t)
                done[0] += 1
                print(f"\r[{spec.name}] {done[0]}/{total} requests ", end="", flush=True)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    stats = pool.stats(window_s=elapsed + 1.0)
    print(f"\n[{spec.name}] checking a sample against the in-process MoELayer ...", flush=True)
    with torch.no_grad():
        sample = xs[0][:64]
        err = (pool.forward(sample) - MoELayer(spec).eval()(sample)).abs().max().item()
    ms = np.array(latencies) * 1e3
    return (
        total * args.tokens / elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        stats,
        err,
    )
