"""Rebalance a running pool for its measured load (--dry-run: only show the plan)."""

from __future__ import annotations

import argparse

from raymoe.cli import _common
from raymoe.placement import POLICIES


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="plan and report; change nothing")
    p.add_argument("--policy", choices=sorted(POLICIES), help="default: the spec's")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    label = "rebalance (dry run)" if args.dry_run else "rebalance"
    with _common.client(args) as c, _common.progress(args, label):
        report = c.rebalance(dry_run=args.dry_run, policy=args.policy)
    _common.emit_report(args, label, report)
    return 0
