"""``python -m cnnlens.runs run|report ...``: the run commands on their own, the same as ``cnnlens run|report``.

Same options, handlers and exit codes: the parsers and the dispatch are :mod:`cnnlens.cli`'s (an entry point,
so it sits above the layers like the ``cnnlens`` command).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cnnlens.cli import common, run_command
from cnnlens.cli.parser_more import add_run_commands


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run ``run`` or ``report``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m cnnlens.runs", description="cnnlens dataset runs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_run_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    common._make_consoles()
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
