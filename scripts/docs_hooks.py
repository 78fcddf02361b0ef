"""MkDocs hooks of the cnnlens site (``mkdocs.yml`` ``hooks:``): the tutorial notebooks become pages.

Each ``notebooks/<name>.ipynb`` becomes the page ``tutorials/<name>.md``, generated at build time from the
notebook's *source*: Markdown cells as they are, code cells as Python blocks. The notebooks are committed
without outputs (``tests/test_notebooks.py`` checks that and executes them in ``make test``), so the site shows
the code a reader runs, not a stale run of it; no Jupyter converter is needed and nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _source(cell: dict[str, Any]) -> str:
    text = cell.get("source", "")
    return "".join(text) if isinstance(text, list) else str(text)


def notebook_markdown(path: Path) -> str:
    """The Markdown page of one notebook: its Markdown cells, and its code cells as ``python`` blocks."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    parts: list[str] = []
    for i, cell in enumerate(notebook.get("cells", [])):
        source = _source(cell).rstrip()
        if not source:
            continue
        if cell.get("cell_type") == "markdown":
            parts.append(source)
            if i == 0:
                parts.append(
                    f"!!! note\n    This page is the notebook `notebooks/{path.name}` of the repository, "
                    "without its outputs: open it in Jupyter to run it. `make test` executes it from top to bottom."
                )
        elif cell.get("cell_type") == "code":
            parts.append(f"```python\n{source}\n```")
    return "\n\n".join(parts) + "\n"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add one generated page per tutorial notebook."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File.generated(config, f"tutorials/{path.stem}.md", content=notebook_markdown(path)))
    return files
