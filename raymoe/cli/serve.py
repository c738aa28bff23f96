"""Deploy a pool from a config and keep serving, with a status line (Ctrl-C or SIGTERM stops
and tears the pool down)."""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
import time
from pathlib import Path


def add_parser(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", help="pool spec YAML")
    source.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a checkpoint PoolHandle.save wrote: its experts, ids and weights",
    )
    source.add_argument(
        "--resume",
        metavar="NAME",
        help="bring back pool NAME after its Ray cluster restarted, from its saved state "
        "($RAYMOE_REDIS_URL, or the embedded store) and weight files",
    )
    source.add_argument(
        "--hf",
        metavar="PATH",
        help="a Hugging Face checkpoint directory (config.json + safetensors): serve its "
        "MoE layers as one multi-layer pool, with their weights",
    )
    p.add_argument("--name", help="pool name (default: the spec's, or the checkpoint's)")
    p.add_argument("--shards", type=int, help="shards (default: the spec's; --hf: 2)")
    p.add_argument(
        "--gateway",
        metavar="[HOST:]PORT",
        help="serve the gRPC gateway there (tokens: $RAYMOE_DATA_TOKEN, "
        "$RAYMOE_ADMIN_TOKEN or the spec's gateway section)",
    )
    p.add_argument(
        "--attach",
        action="store_true",
        help="serve the running pool of that name if there is one (a restarted driver)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the pool running when this command ends (its lifetime is the cluster's)",
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between status lines")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: never)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import raymoe

    try:
        pool = start_pool(args)
    except raymoe.PoolExistsError:
        if not args.attach:
            raise
        pool = raymoe.connect(args.name or args.resume or load(args)[0].name)
        print(f"attached to the running pool {pool.name!r}", flush=True)
    d = pool.describe()
    print(
        f"serving pool {pool.name!r}: {d.experts:,} experts in {d.layers} layer(s) on "
        f"{d.shards} shards, "
        f"{d.routers} router(s); connect with raymoe.connect({pool.name!r})",
        flush=True,
    )
    for endpoint in pool.gateways():
        print(f"gRPC gateway on {endpoint}: raymoe status --target {endpoint}", flush=True)
    t0 = time.monotonic()
    live = sys.stdout.isatty()  # one line rewritten in a terminal; a line each in a log
    start, end = ("\r", "") if live else ("", "\n")
    try:
        with _sigterm_interrupts():
            while args.duration is None or time.monotonic() - t0 < args.duration:
                time.sleep(max(0.0, min(args.interval, _left(args, t0))))
                s = pool.stats(window_s=max(args.interval, 1.0))
                p50, p99 = (s.latency.p50_ms, s.latency.p99_ms) if s.latency else (0.0, 0.0)
                print(
                    f"{start}[{pool.name}] up {time.monotonic() - t0:6.0f}s"
                    f"  requests {s.requests:>7}  tokens/s {s.tokens_per_s:10,.0f}"
                    f"  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  shard imbalance {s.imbalance:.2f} ",
                    end=end,
                    flush=True,
                )
    except KeyboardInterrupt:
        pass
    finally:
        if live:
            print()  # end the status line
        if args.keep:
            print(f"leaving pool {pool.name!r} running", flush=True)
        else:
            print("shutting down", flush=True)
            pool.shutdown()
            print(f"pool {pool.name!r} shut down", flush=True)
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (``ray job stop``, a pod's termination) stops serving like Ctrl-C does. Only
    the main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_pool(args: argparse.Namespace):
    """Serve the pool the arguments name (-> its handle)."""
    import raymoe

    if args.resume:
        if args.shards or args.gateway or args.name:
            from raymoe.errors import ConfigError

            raise ConfigError("--resume brings a pool back as it was saved", "--resume")
        return raymoe.resume(args.resume)
    spec, weights = load(args)
    if args.gateway:
        spec = with_gateway(spec, args.gateway)
    if args.checkpoint:
        return raymoe.serve(spec, name=args.name, checkpoint=args.checkpoint)
    return raymoe.serve(spec, weights=weights, name=args.name)


def load(args: argparse.Namespace):
    """(spec, weights or None) from ``--config``, ``--checkpoint`` (its spec: the shards
    read the weights in place) or ``--hf``, with ``--shards``."""
    import raymoe

    weights = None
    if args.checkpoint:
        from raymoe import checkpoint

        spec, _ = checkpoint.verify(args.checkpoint)
    elif args.hf:
        from raymoe import hf

        name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(args.hf).resolve().name).lstrip("-._")
        spec, weights = hf.from_pretrained(args.hf, name=name[:63] or "hf")
    else:
        spec = raymoe.PoolSpec.from_yaml(args.config)
    if args.shards:
        spec = spec.with_shards(args.shards)
    elif args.hf:
        spec = spec.with_shards(min(2, spec.live_experts))
    return spec, weights


def with_gateway(spec, address: str):
    """``spec`` with its gateway enabled on ``[HOST:]PORT``."""
    from raymoe.errors import ConfigError

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"expected [HOST:]PORT, got {address!r}", "--gateway")
    return spec.with_gateway(enabled=True, port=int(port), **({"host": host} if host else {}))


def _left(args: argparse.Namespace, t0: float) -> float:
    return float("inf") if args.duration is None else args.duration - (time.monotonic() - t0)
