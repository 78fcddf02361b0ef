"""Suite-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def _share_the_cores() -> None:
    """Under pytest-xdist, give each worker its share of the cores (torch, OpenMP and the subprocesses it starts).

    Left alone, every worker runs torch with one thread per core: two workers on two cores run four busy
    threads, and OpenMP's spin-waiting makes such oversubscription slow (the demo test took 133 s instead of
    25 s). Tests that care about thread counts set them themselves; numerics must hold at any count.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 2:
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    os.environ.setdefault("MKL_NUM_THREADS", str(share))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores()


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
