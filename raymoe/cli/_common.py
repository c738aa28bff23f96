"""What the admin commands share: connection flags, the client, output, confirmation,
progress, and the exit codes scripts can rely on.

Exit codes: 0 done; 1 the pool could not do it; 2 bad usage or input the pool refused;
3 the gateway is unreachable or too slow; 4 missing, wrong or insufficient token;
5 not confirmed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from raymoe.errors import (
    AuthenticationError,
    ConfigError,
    DeadlineExceededError,
    InvalidInputError,
    PermissionDeniedError,
    PoolNotFoundError,
    PoolUnavailableError,
    RaymoeError,
)
from raymoe.reports import OpReport

TARGET_ENV = "RAYMOE_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"


class NotConfirmedError(RaymoeError):
    """A destructive command was not confirmed."""


EXIT_CODES: tuple[tuple[type, int], ...] = (
    (NotConfirmedError, 5),
    (AuthenticationError, 4),
    (PermissionDeniedError, 4),
    (PoolUnavailableError, 3),
    (DeadlineExceededError, 3),
    (PoolNotFoundError, 3),
    (InvalidInputError, 2),
    (ConfigError, 2),
    (RaymoeError, 1),
)


def exit_code(error: RaymoeError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(error, cls))


def connection_parser() -> argparse.ArgumentParser:
    """Flags every command that talks to a gateway takes (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
        help=f"gateway host:port (${TARGET_ENV}, default {DEFAULT_TARGET})",
    )
    g.add_argument("--token-file", help="file holding the bearer token (default: $RAYMOE_TOKEN)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root CAs")
    g.add_argument("--ca-file", help="TLS: the CA that signed the gateway's certificate (PEM)")
    g.add_argument("--cert-file", help="TLS: client certificate for mutual TLS (PEM)")
    g.add_argument("--key-file", help="TLS: client key for mutual TLS (PEM)")
    g.add_argument("--server-name", help="TLS: name expected in the gateway's certificate")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per call (600)")
    p.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people, json for scripts",
    )
    return p


def destructive(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def client(args: argparse.Namespace):
    from raymoe.client import TLS, Client

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the token file: {e.strerror}", "--token-file") from None
    tls = None
    if args.tls or args.ca_file or args.cert_file:
        tls = TLS(args.ca_file, args.cert_file, args.key_file, args.server_name)
    return Client(
        args.target, token=token, tls=tls, timeout_s=args.timeout, admin_timeout_s=args.timeout
    )


def confirm(args: argparse.Namespace, question: str) -> None:
    """Ask on the terminal unless ``--yes``; refuse when nobody can answer."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise NotConfirmedError(f"{question}: not confirmed (pass --yes to run without a prompt)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise NotConfirmedError("not confirmed; nothing changed")


@contextlib.contextmanager
def progress(args: argparse.Namespace, label: str):
    """Elapsed time on stderr while a long call runs (only on a terminal, never in json)."""
    if args.output == "json" or not sys.stderr.isatty():
        yield
        return
    done = threading.Event()
    t0 = time.monotonic()

    def tick():
        while not done.wait(0.2):
            print(
                f"\r{label} ... {time.monotonic() - t0:5.1f} s", end="", file=sys.stderr, flush=True
            )

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(f"\r{label} ... done in {time.monotonic() - t0:.1f} s", file=sys.stderr)


def emit(args: argparse.Namespace, data: dict, table: str) -> None:
    """``data`` (JSON-able) for ``-o json``, else ``table``."""
    print(json.dumps(data, indent=2) if args.output == "json" else table)


def emit_report(args: argparse.Namespace, title: str, report: OpReport) -> None:
    emit(args, report.to_dict(), report_table(title, report))


def report_table(title: str, report: OpReport) -> str:
    """A runtime operation's report, for people."""
    rows = {
        "placement version": report.version,
        "replicas added": report.replicas_added,
        "replicas dropped": report.replicas_dropped,
        "bytes moved": _bytes(report.bytes_moved),
        "imbalance": f"{report.imbalance_before:.3f} -> {report.imbalance_after:.3f}",
    }
    for key in ("expert_ids", "removed", "pinned", "policy"):
        if getattr(report, key):
            rows[key.replace("_", " ")] = getattr(report, key)
    if report.dry_run:
        rows["dry run"] = "yes: nothing changed"
    width = max(len(k) for k in rows)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows.items()])


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
