"""Suite-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_inherited_terminal_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test as a piped command with no width hint.

    pytest-xdist workers inherit ``COLUMNS=80``/``LINES=24`` from execnet, which would make the CLI fold its
    tables at 80 columns under ``-n`` and not without it; a test that needs a width sets ``COLUMNS`` itself.
    """
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
