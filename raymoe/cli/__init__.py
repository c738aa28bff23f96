"""The ``raymoe`` command line: a thin shell over the Python API and the SDK, one module per
noun. Admin commands reach a pool's gRPC gateway (--target / $RAYMOE_TARGET, token from
--token-file / $RAYMOE_TOKEN)."""

from __future__ import annotations

import argparse
import sys

from raymoe.cli import (
    _common,
    checkpoint,
    demo,
    experts,
    plot,
    rebalance,
    serve,
    shards,
    status,
    submit,
    top,
)
from raymoe.errors import RaymoeError

LOCAL = {"demo": demo, "serve": serve, "submit": submit}  # start pools
REMOTE = {
    "status": status,
    "top": top,
    "experts": experts,
    "shards": shards,
    "rebalance": rebalance,
    "plot": plot,
    "checkpoint": checkpoint,
}

EPILOG = """exit codes: 0 done; 1 the pool could not do it; 2 bad usage or input the pool
refused; 3 gateway unreachable or too slow; 4 missing, wrong or insufficient token;
5 not confirmed; 130 interrupted"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raymoe", description=__doc__, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in LOCAL.items():
        module.add_parser(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    conn = _common.connection_parser()
    for name, module in REMOTE.items():
        doc = module.__doc__.splitlines()[0]
        if getattr(module, "HAS_VERBS", False):
            module.add_parser(sub.add_parser(name, help=doc, description=doc), parents=[conn])
        else:
            module.add_parser(sub.add_parser(name, help=doc, description=doc, parents=[conn]))
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except RaymoeError as e:
        print(f"raymoe: error: {e}", file=sys.stderr)
        return _common.exit_code(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
