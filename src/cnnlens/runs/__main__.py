"""``python -m cnnlens.runs run|report ...``: the run commands on their own (same options and exit codes)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cnnlens.errors import CnnlensError
from cnnlens.runs.cli import EXIT_USAGE, add_run_commands


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run ``run`` or ``report``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m cnnlens.runs", description="cnnlens dataset runs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_run_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code: int = args.handler(args)
    except CnnlensError as exc:
        from rich.console import Console

        Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(
            f"[bold red]error:[/] {exc}", highlight=False
        )
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
