"""Scale the shards of a running pool, or drain one."""

from __future__ import annotations

import argparse

from raymoe.cli import _common

HAS_VERBS = True  # the connection flags go on each verb


def add_parser(p: argparse.ArgumentParser, parents: list) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    s = verbs.add_parser(
        "scale", help="grow or shrink to N shards (experts redistributed)", parents=parents
    )
    s.add_argument("count", type=int)
    _common.destructive(s)
    s.set_defaults(run=scale)
    d = verbs.add_parser(
        "drain", help="move every replica off a shard (it stays up)", parents=parents
    )
    d.add_argument("shard", type=int)
    _common.destructive(d)
    d.set_defaults(run=drain)


def scale(args: argparse.Namespace) -> int:
    with _common.client(args) as c:
        now = c.describe().shards
        if args.count < now:
            _common.confirm(
                args, f"scale the pool at {args.target} down from {now} to {args.count} shards"
            )
        with _common.progress(args, f"scale to {args.count} shards"):
            report = c.scale_shards(args.count)
    _common.emit_report(args, f"scale {now} -> {args.count} shards", report)
    return 0


def drain(args: argparse.Namespace) -> int:
    _common.confirm(args, f"drain shard {args.shard} of the pool at {args.target}")
    with _common.client(args) as c, _common.progress(args, f"drain shard {args.shard}"):
        report = c.drain_shard(args.shard)
    _common.emit_report(args, f"drain shard {args.shard}", report)
    return 0
