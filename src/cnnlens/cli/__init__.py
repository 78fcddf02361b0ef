"""The ``cnnlens`` command line: explain, layers, models, methods, studies, forward views, dataset runs, demo.

Every command has ``--help``. Errors in what the user asked for print one clear line and exit with code 2;
a bad input file never stops the others: it is reported at the end and the exit code is 1.

One dispatch: :data:`COMMANDS` maps every sub-command to the module and function that handle it; the module is
imported only when its command runs, so ``cnnlens --help``, ``cnnlens COMMAND --help``, ``--version`` and usage
errors never import torch. Modules: :mod:`~cnnlens.cli.common` (consoles, exit codes, loading, checks),
:mod:`~cnnlens.cli.parser` and :mod:`~cnnlens.cli.parser_more` (argparse), :mod:`~cnnlens.cli.explain`,
:mod:`~cnnlens.cli.catalog` (layers, models, methods), :mod:`~cnnlens.cli.studies`, :mod:`~cnnlens.cli.views`,
:mod:`~cnnlens.cli.runs` and :mod:`~cnnlens.cli.demo`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable, Sequence

from rich.markup import escape

from cnnlens.allocator import keep_freed_memory_unless_disabled
from cnnlens.cli import common
from cnnlens.cli.common import EXIT_USAGE, _check_args, _cli_hint, resolve_class
from cnnlens.cli.parser import _build_parser
from cnnlens.errors import CnnlensError

__all__ = ["COMMANDS", "handler", "main", "resolve_class", "run_command"]

COMMANDS: dict[str, tuple[str, str]] = {
    "explain": ("cnnlens.cli.explain", "cmd_explain"),
    "layers": ("cnnlens.cli.catalog", "cmd_layers"),
    "models": ("cnnlens.cli.catalog", "cmd_models"),
    "methods": ("cnnlens.cli.catalog", "cmd_methods"),
    "compare-layers": ("cnnlens.cli.studies", "cmd_compare_layers"),
    "compare-models": ("cnnlens.cli.studies", "cmd_compare_models"),
    "filters": ("cnnlens.cli.views", "cmd_filters"),
    "features": ("cnnlens.cli.views", "cmd_features"),
    "maximize": ("cnnlens.cli.views", "cmd_maximize"),
    "run": ("cnnlens.cli.runs", "cmd_run"),
    "report": ("cnnlens.cli.runs", "cmd_report"),
    "demo": ("cnnlens.cli.demo", "cmd_demo"),
    "serve": ("cnnlens.cli.serve", "cmd_serve"),
}
"""Sub-command -> ``(module, function)`` of its handler: the one table every command is dispatched through."""


def handler(command: str) -> Callable[[argparse.Namespace], int]:
    """The handler of ``command``, its module imported now (see :data:`COMMANDS`).

    Example:
        >>> handler("methods").__name__
        'cmd_methods'
    """
    module, name = COMMANDS[command]
    found: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
    return found


def run_command(args: argparse.Namespace) -> int:
    """Check the parsed ``args`` and run their command; a :class:`CnnlensError` becomes one line and exit code 2.

    Used by :func:`main` and by ``python -m cnnlens.runs``.
    """
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    keep_freed_memory_unless_disabled()  # up to 1.6x faster CPU forwards; see cnnlens.allocator
    try:
        _check_args(args)
        return handler(args.command)(args)
    except CnnlensError as exc:
        common.err_console.print(f"[bold red]error:[/] {escape(_cli_hint(str(exc)))}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        common.err_console.print("interrupted")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnnlens`` command; returns the exit code.

    ``--help``, ``--version`` and usage errors answer from the parser alone, without importing torch. Every
    argument is then checked (:func:`cnnlens.cli.common._check_args`) before a model is loaded.
    """
    common._make_consoles()
    return run_command(_build_parser().parse_args(argv))
