"""Draw a pool's load as a PNG: shard x expert heat map, and expert load over time."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from raymoe.cli import _common
from raymoe.errors import ConfigError

HAS_VERBS = True
MAX_SAMPLES = 3600
MAX_INTERVAL_S = 3600.0


def add_parser(p: argparse.ArgumentParser, parents: list) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    load = verbs.add_parser(
        "load",
        help="heat map of expert load by shard (and over time, with --samples)",
        parents=parents,
    )
    load.add_argument("--out", required=True, help="the PNG to write")
    load.add_argument("--window", type=float, default=60.0, help="seconds the map covers (60)")
    load.add_argument(
        "--bins", type=int, default=128, help="expert columns: bins of consecutive ids (128)"
    )
    load.add_argument(
        "--samples",
        type=int,
        default=0,
        help="also sample the expert load this many times, --interval apart, for a time axis",
    )
    load.add_argument("--interval", type=float, default=2.0, help="seconds between samples (2)")
    load.set_defaults(run=run_load)


def run_load(args: argparse.Namespace) -> int:
    from raymoe import plot

    if not 0 <= args.samples <= MAX_SAMPLES:
        raise ConfigError(f"must be in [0, {MAX_SAMPLES}]", "--samples")
    if not 0 < args.interval <= MAX_INTERVAL_S:
        raise ConfigError(f"must be in (0, {MAX_INTERVAL_S:g}]", "--interval")
    if not Path(args.out).parent.is_dir():
        raise ConfigError(f"no directory {Path(args.out).parent}", "--out")
    plot._figure_class()  # no matplotlib: say so before any sampling
    history = []
    with _common.client(args) as c:
        for i in range(args.samples):
            if i:
                time.sleep(args.interval)
            history.append((time.monotonic(), c.stats(max(args.interval, 1.0))))
        stats = c.stats(args.window, load_bins=args.bins)
    fig = plot.load_figure(stats, history, title=f"raymoe pool at {args.target}")
    path = plot.save(fig, args.out)
    shards, bins = stats.load_map.shape
    _common.emit(
        args,
        {"out": str(path), "shards": shards, "bins": bins, "samples": len(history)},
        f"wrote {path}: {shards} shards x {bins} expert bins"
        + (f", {len(history)} samples" if history else ""),
    )
    return 0
