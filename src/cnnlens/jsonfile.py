"""Strict JSON for every file cnnlens writes: no bare ``NaN``/``Infinity`` (which strict parsers reject).

Example:
    >>> dumps_strict({"score": float("nan"), "ok": [1.0, float("inf")]})
    '{"score": null, "ok": [1.0, null]}'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["dumps_strict", "finite_or_null"]


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps_strict(doc: Any, **kwargs: Any) -> str:
    """:func:`json.dumps` of ``doc`` with non-finite floats written as ``null``, enforced with ``allow_nan=False``.

    Keyword arguments go to :func:`json.dumps` (``indent``, ``default``...). Objects that ``default`` turns into
    floats are not revisited; ``allow_nan=False`` still refuses them rather than writing invalid JSON.
    """
    return json.dumps(finite_or_null(doc), allow_nan=False, **kwargs)
