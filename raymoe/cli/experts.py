"""Add, remove, replicate, pin and unpin experts of a running pool."""

from __future__ import annotations

import argparse

import numpy as np

from raymoe.cli import _common

HAS_VERBS = True  # the connection flags go on each verb


def add_parser(p: argparse.ArgumentParser, parents: list) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    a = verbs.add_parser("add", help="add experts (new, stable ids)", parents=parents)
    a.add_argument("count", type=int)
    a.add_argument(
        "--weights",
        help=".npz of neutral-name weights stacked over the new experts "
        "(default: the seeded init of the new ids)",
    )
    _layer(a)
    a.set_defaults(run=add)
    r = verbs.add_parser("remove", help="stop routing to experts and free them", parents=parents)
    r.add_argument("ids", type=int, nargs="+")
    _common.destructive(r)
    _layer(r)
    r.set_defaults(run=remove)
    pairs = (
        ("replicate", replicate, "give an expert exactly N replicas"),
        ("pin", pin, "like replicate, and later rebalances keep N"),
    )
    for verb, fn, text in pairs:
        v = verbs.add_parser(verb, help=text, parents=parents)
        v.add_argument("id", type=int)
        v.add_argument("replicas", type=int)
        _layer(v)
        v.set_defaults(run=fn)
    u = verbs.add_parser(
        "unpin", help="let rebalances choose an expert's replicas again", parents=parents
    )
    u.add_argument("id", type=int)
    _layer(u)
    u.set_defaults(run=unpin)


def _layer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", type=int, default=0, help="the MoE layer (multi-layer pools)")


def _call(args, label: str, fn, *call_args) -> int:
    if args.layer:
        label += f" of layer {args.layer}"
    with _common.client(args) as c, _common.progress(args, label):
        report = fn(c)(*call_args, layer=args.layer)
    _common.emit_report(args, label, report)
    return 0


def add(args: argparse.Namespace) -> int:
    weights = None
    if args.weights:
        try:
            with np.load(args.weights) as f:
                weights = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise _common.ConfigError(f"cannot read {args.weights}: {e}", "--weights") from None
    return _call(args, f"add {args.count} experts", lambda c: c.add_experts, args.count, weights)


def remove(args: argparse.Namespace) -> int:
    _common.confirm(args, f"remove experts {args.ids} from the pool at {args.target}")
    return _call(args, f"remove experts {args.ids}", lambda c: c.remove_experts, args.ids)


def replicate(args: argparse.Namespace) -> int:
    label = f"replicate expert {args.id} x{args.replicas}"
    return _call(args, label, lambda c: c.replicate, args.id, args.replicas)


def pin(args: argparse.Namespace) -> int:
    label = f"pin expert {args.id} x{args.replicas}"
    return _call(args, label, lambda c: c.pin, args.id, args.replicas)


def unpin(args: argparse.Namespace) -> int:
    return _call(args, f"unpin expert {args.id}", lambda c: c.unpin, args.id)
