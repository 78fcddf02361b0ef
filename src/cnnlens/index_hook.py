"""The explain index writer: how the core's file writing gets an ``index.html`` without importing the report layer.

:meth:`cnnlens.explanation.ExplanationSet.save` and :class:`cnnlens.explanation.ExplainFolder` write arrays,
PNGs and ``manifest.json`` themselves, then call the writer set here to render ``index.html``. The report layer
(:func:`cnnlens.report.render_explain_report`) is that writer; the package facade (``cnnlens/__init__``, the top
of the layers) sets it when cnnlens is imported, as a function that imports jinja2 only when it first runs. So
the layers stay one way (``explanation`` never imports ``report``) and ``result.save(dir)`` writes the same page
as ``cnnlens explain``.

Example:
    >>> from pathlib import Path
    >>> previous = set_index_writer(lambda root, **kw: Path(root) / "index.html")
    >>> index_writer()("out", title="t", subtitle="s").as_posix()
    'out/index.html'
    >>> _ = set_index_writer(previous)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from cnnlens.errors import CnnlensError

__all__ = ["IndexWriter", "index_writer", "set_index_writer"]


class IndexWriter(Protocol):
    """Render ``index.html`` of an explain folder from its ``manifest.json``; return the page's path."""

    def __call__(self, directory: str | os.PathLike[str], *, title: str, subtitle: str) -> Path:
        """Write the page for ``directory``; return its path."""
        ...


_writer: IndexWriter | None = None


def set_index_writer(writer: IndexWriter | None) -> IndexWriter | None:
    """Set the explain index writer (None: unset); returns the previous one."""
    global _writer
    previous, _writer = _writer, writer
    return previous


def index_writer() -> IndexWriter:
    """The explain index writer.

    Raises:
        CnnlensError: None is set (only possible when ``cnnlens/__init__`` did not run its set-up).
    """
    if _writer is None:
        raise CnnlensError(
            "no explain index writer is set: cnnlens/__init__ sets cnnlens.report.render_explain_report when "
            "cnnlens is imported; call cnnlens.index_hook.set_index_writer(render_explain_report) first."
        )
    return _writer
