"""Sample RGB photos bundled with scikit-image, for demos, docs and tests that must run offline.

Only pictures shipped inside the scikit-image wheel are listed, so nothing here touches the network
(images that scikit-image downloads on demand through ``pooch`` are deliberately left out).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from cnnlens.errors import ImageReadError

__all__ = ["SAMPLE_NAMES", "sample_image", "sample_images", "write_sample_images"]

SAMPLE_NAMES: tuple[str, ...] = (
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
"""Names accepted by :func:`sample_image`: RGB photos bundled with scikit-image.

``chelsea`` (a cat), ``coffee`` (a cup of coffee), ``astronaut`` (Eileen Collins), ``rocket`` (a
SpaceX launch), ``motorcycle_left``/``motorcycle_right`` (a Middlebury stereo pair),
``hubble_deep_field`` (galaxies), ``immunohistochemistry`` (stained tissue) and ``retina`` (a fundus
photograph).
"""


def _loader(name: str) -> Callable[[], Any]:
    """Return the scikit-image function producing sample ``name`` (imported lazily: it is slow)."""
    from skimage import data

    if name in ("motorcycle_left", "motorcycle_right"):
        stereo: Callable[[], Any] = data.stereo_motorcycle
        index = 0 if name == "motorcycle_left" else 1
        return lambda: stereo()[index]
    loader: Callable[[], Any] = getattr(data, name)
    return loader


def sample_image(name: str) -> NDArray[np.uint8]:
    """Return one sample photo.

    Args:
        name: One of :data:`SAMPLE_NAMES`.

    Returns:
        A new, C-contiguous ``uint8`` array of shape ``(H, W, 3)`` in RGB order.

    Raises:
        ImageReadError: ``name`` is not a sample name (the message lists the valid ones), or
            scikit-image could not provide the picture.
    """
    if name not in SAMPLE_NAMES:
        raise ImageReadError(f"Unknown sample image {name!r}. Valid names: {', '.join(SAMPLE_NAMES)}.")
    try:
        raw = _loader(name)()
    except (ImportError, OSError, KeyError, ValueError) as exc:
        raise ImageReadError(
            f"Cannot load sample image {name!r} from scikit-image ({type(exc).__name__}: {exc}). "
            "Reinstall scikit-image (its wheel bundles this picture)."
        ) from exc
    image = np.asarray(raw)
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ImageReadError(
            f"Sample image {name!r} from scikit-image has shape {image.shape} and dtype {image.dtype}, "
            "expected (H, W, 3) uint8. Your scikit-image version may have changed it."
        )
    return np.array(image[:, :, :3], dtype=np.uint8, order="C")


def sample_images(names: Iterable[str] | None = None) -> dict[str, NDArray[np.uint8]]:
    """Return several sample photos by name.

    Args:
        names: Sample names; all of :data:`SAMPLE_NAMES` when ``None``.

    Returns:
        A dict from name to ``(H, W, 3)`` ``uint8`` array, in the order asked.

    Raises:
        ImageReadError: A name is unknown.
    """
    chosen = SAMPLE_NAMES if names is None else tuple(names)
    return {name: sample_image(name) for name in chosen}


def write_sample_images(directory: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """Write sample photos as ``<name>.png`` files, creating the directory if needed.

    Args:
        directory: Where to write; created with its parents if missing. Existing files are overwritten.
        names: Sample names; all of :data:`SAMPLE_NAMES` when ``None``.

    Returns:
        The written paths, in the order of ``names``.

    Raises:
        ImageReadError: A name is unknown (checked before anything is written).
        OSError: The directory or a file could not be written.
    """
    chosen = SAMPLE_NAMES if names is None else tuple(names)
    unknown = [name for name in chosen if name not in SAMPLE_NAMES]
    if unknown:
        raise ImageReadError(
            f"Unknown sample image(s) {', '.join(map(repr, unknown))}. Valid names: {', '.join(SAMPLE_NAMES)}."
        )
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in chosen:
        path = out_dir / f"{name}.png"
        Image.fromarray(sample_image(name)).save(path, format="PNG")
        written.append(path)
    return written
