"""docs/architecture.md cannot rot silently: every ``cnnlens.x.y`` it names in backticks exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
_NAME = re.compile(r"`(cnnlens(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")


def _named() -> list[str]:
    return sorted(set(_NAME.findall(DOC.read_text(encoding="utf-8"))))


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted``, then look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_doc_names_modules() -> None:
    names = _named()
    assert "cnnlens.capture.scope" in names and "cnnlens.models.loader" in names
    assert len(names) > 30


@pytest.mark.parametrize("dotted", _named())
def test_every_module_path_in_the_doc_exists(dotted: str) -> None:
    try:
        _resolve(dotted)
    except (ModuleNotFoundError, AttributeError) as exc:
        pytest.fail(f"docs/architecture.md names `{dotted}`, which does not exist ({exc}); update the doc.")


def test_a_missing_path_is_caught() -> None:
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        _resolve("cnnlens.models.no_such_module")
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        _resolve("cnnlens.NoSuchName")
