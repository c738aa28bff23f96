"""``python -m raymoe``: the command line (what a Ray job's entrypoint runs)."""

import sys

from raymoe.cli import main

sys.exit(main())
