"""Save a running pool's checkpoint, or verify one (serve it with raymoe serve --checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from raymoe.cli import _common

HAS_VERBS = True  # the connection flags go on each verb


def add_parser(p: argparse.ArgumentParser, parents: list) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    s = verbs.add_parser(
        "save",
        help="write the pool's checkpoint to DIR (a path the pool's controller can write)",
        parents=parents,
    )
    s.add_argument("dir")
    s.set_defaults(run=save)
    v = verbs.add_parser(
        "verify", help="check a checkpoint's files, hashes and rows (no pool needed)"
    )
    v.add_argument("dir")
    v.add_argument("-o", "--output", choices=("text", "json"), default="text")
    v.set_defaults(run=verify)


def save(args: argparse.Namespace) -> int:
    path = str(Path(args.dir).resolve())
    with _common.client(args) as c, _common.progress(args, f"checkpoint to {path}"):
        manifest = c.save(path)
    _common.emit(args, _summary(path, manifest), _text(path, manifest))
    return 0


def verify(args: argparse.Namespace) -> int:
    from raymoe import checkpoint

    _, manifest = checkpoint.verify(args.dir)
    _common.emit(args, _summary(args.dir, manifest), _text(args.dir, manifest) + "  (verified)")
    return 0


def _summary(path, manifest: dict) -> dict:
    files = manifest["files"]
    return {
        "path": str(path),
        "placement_version": manifest["placement_version"],
        "files": len(files),
        "bytes": sum(f["bytes"] for f in files.values()),
    }


def _text(path, manifest: dict) -> str:
    s = _summary(path, manifest)
    return (
        f"checkpoint {s['path']}: placement v{s['placement_version']}, {s['files']} files, "
        f"{s['bytes']:,} bytes"
    )
