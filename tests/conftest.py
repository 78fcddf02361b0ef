"""Suite-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_inherited_terminal_size() -> Iterator[None]:
    """Run every test as a piped command with no width hint.

    pytest-xdist workers inherit ``COLUMNS=80``/``LINES=24`` from execnet, which would make the CLI fold its
    tables at 80 columns under ``-n`` and not without it; a test that needs a width sets ``COLUMNS`` itself.
    This fixture does not use ``monkeypatch``: sharing that fixture would make every test's own monkeypatch
    undo run after the test module's autouse fixtures check their globals.
    """
    saved = {name: os.environ.pop(name) for name in ("COLUMNS", "LINES") if name in os.environ}
    try:
        yield
    finally:
        for name in ("COLUMNS", "LINES"):
            os.environ.pop(name, None)
        os.environ.update(saved)
