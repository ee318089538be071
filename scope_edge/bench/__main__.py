"""python -m scope_edge.bench: `scope-edge bench` without the rest of the command."""
from __future__ import annotations

import argparse
import logging
import sys

from .command import __doc__ as DOC
from .command import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m scope_edge.bench", description=DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add_arguments(parser)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
try:
    sys.exit(main(parser.parse_args()))
except ValueError as e:
    print(f"scope-edge bench: error: {e}", file=sys.stderr)
    sys.exit(2)
