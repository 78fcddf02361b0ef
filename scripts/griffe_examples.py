"""A griffe extension for the cnnlens API pages: a docstring's ``Example:`` section is read as ``Examples:``.

cnnlens docstrings follow the Google style with a singular ``Example:`` heading; griffe's Google parser only
knows ``Examples:``, and would render the ``>>>`` lines as nested Markdown quotes. Renamed at load, they become
doctest blocks. Used by ``mkdocs.yml`` (``extensions:`` of the mkdocstrings Python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` to ``Examples:`` in every loaded docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Fix the docstring of one loaded object (module, class, function, attribute)."""
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
