"""Strip the outputs and execution counts of the tutorial notebooks before committing them.

``tests/test_notebooks.py`` requires committed notebooks without outputs (``make test`` executes them anyway).
Run from the repository root: ``.venv/bin/python scripts/strip_notebooks.py [NOTEBOOK...]`` (default: every
``notebooks/*.ipynb``); it prints the notebooks it changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def strip(path: Path) -> bool:
    """Clear one notebook's outputs and execution counts in place; return whether anything changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
    if changed:
        nbformat.write(notebook, path)
    return changed


def main(argv: list[str]) -> int:
    """Strip the given notebooks (default: all of ``notebooks/``); returns the exit code."""
    paths = [Path(a) for a in argv] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if strip(path):
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
