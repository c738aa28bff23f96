"""The ``raymoe`` command line: a thin shell over the Python API, one module per noun."""

from __future__ import annotations

import argparse
import sys

from raymoe.cli import demo, serve
from raymoe.errors import RaymoeError

COMMANDS = {"demo": demo, "serve": serve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raymoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except RaymoeError as e:
        print(f"raymoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
