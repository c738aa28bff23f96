"""Watch a pool live: the status table, refreshed (Ctrl-C stops)."""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from raymoe.cli import _common, status

CLEAR = "\x1b[H\x1b[2J"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--iterations", type=int, help="stop after this many refreshes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise _common.ConfigError("must be > 0", "--interval")
    rounds = range(args.iterations) if args.iterations is not None else itertools.count()
    with _common.client(args) as c:
        for i in rounds:
            if i:
                time.sleep(args.interval)
            d, s = c.describe(), c.stats(max(args.interval, 1.0))
            if args.output == "json":
                _common.emit(args, status.as_json(d, s), "")
                continue
            clear = CLEAR if sys.stdout.isatty() else ("\n" if i else "")
            print(
                f"{clear}{time.strftime('%H:%M:%S')}  {c.target}\n{status.render(d, s)}", flush=True
            )
    return 0
