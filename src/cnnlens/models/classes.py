"""Class names: the 1000 ImageNet categories (offline) and user label files.

Example:
    >>> names = imagenet_class_names()
    >>> len(names), names[285]
    (1000, 'Egyptian cat')
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from cnnlens.errors import ModelConfigError

__all__ = ["imagenet_class_names", "read_class_names", "resolve_class_names"]


@lru_cache(maxsize=1)
def _imagenet_names() -> tuple[str, ...]:
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return tuple(str(c) for c in categories)


def imagenet_class_names() -> list[str]:
    """Return the 1000 ImageNet-1k class names in the standard index order, without any network access.

    The names come from torchvision's weights metadata
    (``ResNet50_Weights.IMAGENET1K_V1.meta["categories"]``), which every ImageNet-1k model in the zoo shares
    (timm's ``inception_resnet_v2`` has no background class, so there is no label offset).

    Returns:
        a fresh list of 1000 strings, e.g. index 285 is ``"Egyptian cat"``.
    """
    return list(_imagenet_names())


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Read class names from a file.

    Supported formats:

    - ``.json``: a list of strings, or an object mapping indices ``"0".."N-1"`` to names;
    - anything else (``.txt``): one name per line; surrounding whitespace is stripped and blank lines are
      skipped.

    Args:
        path: the file to read.

    Returns:
        the class names in index order.

    Raises:
        ModelConfigError: the file is missing, unreadable, empty or not in a supported format.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelConfigError(
            f"Class-names file not found: {str(p)!r}. Pass a .txt file with one class name per line or a "
            ".json list of names."
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(
            f"Could not read class-names file {str(p)!r}: {exc}. Pass a UTF-8 text file with one name per line."
        ) from exc
    names: list[str]
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelConfigError(
                f"Class-names file {str(p)!r} is not valid JSON ({exc}). Write a JSON list of strings, "
                'e.g. ["cat", "dog"].'
            ) from exc
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            names = [n.strip() for n in data]
        elif isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            try:
                indexed = {int(k): v.strip() for k, v in data.items()}
            except ValueError as exc:
                raise ModelConfigError(
                    f"Class-names file {str(p)!r} maps non-integer keys to names; keys must be the class "
                    'indices "0".."N-1".'
                ) from exc
            if sorted(indexed) != list(range(len(indexed))):
                raise ModelConfigError(
                    f"Class-names file {str(p)!r} must map every index 0..{len(indexed) - 1} exactly once; "
                    f"received keys {sorted(indexed)[:10]}..."
                )
            names = [indexed[i] for i in range(len(indexed))]
        else:
            raise ModelConfigError(
                f"Class-names file {str(p)!r} must hold a JSON list of strings (or an object index -> name); "
                f"received a {type(data).__name__}."
            )
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ModelConfigError(f"Class-names file {str(p)!r} holds no class names. Write one name per line.")
    if any(not n for n in names):
        raise ModelConfigError(f"Class-names file {str(p)!r} contains an empty class name; remove it.")
    return names


def resolve_class_names(class_names: Sequence[str] | str | os.PathLike[str] | None, num_classes: int) -> list[str]:
    """Decide the class names of a model with ``num_classes`` outputs.

    Args:
        class_names: a sequence of names, a path to a names file (see :func:`read_class_names`), or None.
        num_classes: the number of model outputs.

    Returns:
        the given names; else the ImageNet names when ``num_classes == 1000``; else ``class_0..class_{N-1}``.

    Raises:
        ModelConfigError: the number of names differs from ``num_classes``, or a name is not a string.
    """
    if class_names is None:
        if num_classes == 1000:
            return imagenet_class_names()
        return [f"class_{i}" for i in range(num_classes)]
    if isinstance(class_names, (str, os.PathLike)):
        names = read_class_names(class_names)
        origin = f"file {os.fspath(class_names)!r}"
    else:
        names = list(class_names)
        if not all(isinstance(n, str) for n in names):
            raise ModelConfigError(
                "class_names must be strings; received types "
                f"{sorted({type(n).__name__ for n in names})}. Pass a list of str or a names file path."
            )
        origin = "the class_names list"
    if len(names) != num_classes:
        raise ModelConfigError(
            f"The model has {num_classes} outputs but {origin} holds {len(names)} class names. Pass exactly "
            f"{num_classes} names (one per output, in index order), or set num_classes={len(names)} "
            "(--num-classes) if the checkpoint was trained with that many classes."
        )
    return names
