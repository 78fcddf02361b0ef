"""Read image files into RGB ``uint8`` arrays, with clear errors for every way a file can be bad.

This is the lowest input layer of cnnlens: it turns paths (or bytes) into ``(H, W, 3)`` ``uint8`` arrays
and never lets a raw PIL exception escape. Every failure is an
:class:`~cnnlens.errors.ImageReadError` whose message names the file and says what to do.

The conversion rules (EXIF orientation, first frame, 16-bit and float scaling, alpha compositing) and the
size guard are documented in :mod:`cnnlens.data.pixels`; listing folders is :mod:`cnnlens.data.folders`.

Example:
    >>> image = load_image("cat.jpg")  # doctest: +SKIP
    >>> image.shape, image.dtype  # doctest: +SKIP
    ((480, 640, 3), dtype('uint8'))
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cnnlens.data.folders import ImageFailure, expand_paths
from cnnlens.data.pixels import IMAGE_EXTENSIONS, decode_stream
from cnnlens.errors import ImageReadError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageFailure",
    "expand_paths",
    "iter_images",
    "load_image",
    "load_image_bytes",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = 100_000_000
"""Largest accepted ``width * height`` (100 megapixels, e.g. 10000 x 10000).

A guard against decompression bombs: a small compressed file that declares a huge canvas would
otherwise allocate gigabytes. Decoded as RGB, 100 megapixels is 300 MB. Pass ``max_pixels`` to
:func:`load_image` to change it per call.
"""


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> NDArray[np.uint8]:
    """Read an image file into an RGB ``uint8`` array.

    See the module docstring for the conversion rules (EXIF orientation, first frame, 16-bit, ``I`` and
    ``F`` scaling, alpha compositing).

    Args:
        path: The image file.
        max_pixels: Largest accepted ``width * height``, checked from the header before decoding.
        background: RGB colour, each in ``0..255``, that transparent pixels are composited over.

    Returns:
        A C-contiguous, writable ``uint8`` array of shape ``(H, W, 3)`` in RGB order.

    Raises:
        ImageReadError: The file is missing, a directory, not a regular file, unreadable (permissions),
            empty, not an image, truncated, corrupt, larger than ``max_pixels`` or in an unsupported
            mode. The message contains the path.
        ValueError: ``max_pixels`` or ``background`` is invalid.
    """
    _check_options(max_pixels, background)
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageReadError(
            f"Cannot read image {name!r}: no such file (working directory: {os.getcwd()!r}). "
            "Check the path and its spelling."
        ) from None
    except PermissionError:
        raise ImageReadError(
            f"Cannot read image {name!r}: permission denied while looking up the file. "
            "Check the permissions of its parent directories."
        ) from None
    except OSError as exc:
        raise ImageReadError(f"Cannot read image {name!r}: {exc.strerror or exc}.") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(
            f"Cannot read image {name!r}: it is a directory, not a file. "
            "Pass the image files inside it, or expand it with expand_paths()."
        )
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(
            f"Cannot read image {name!r}: it is not a regular file (a device, pipe or socket). Pass an image file."
        )
    if st.st_size == 0:
        raise ImageReadError(
            f"Cannot read image {name!r}: the file is empty (0 bytes). "
            "It was probably not written completely; re-download or re-export it."
        )
    try:
        fh = open(name, "rb")  # noqa: SIM115 - closed by the with block right below
    except PermissionError:
        raise ImageReadError(
            f"Cannot read image {name!r}: permission denied. Check the file permissions "
            "(e.g. chmod u+r) or run as a user allowed to read it."
        ) from None
    except IsADirectoryError:
        raise ImageReadError(f"Cannot read image {name!r}: it is a directory, not a file.") from None
    except OSError as exc:
        raise ImageReadError(f"Cannot read image {name!r}: {exc.strerror or exc}.") from exc
    with fh:
        return decode_stream(fh, name, max_pixels, background)


def load_image_bytes(
    data: bytes,
    *,
    name: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> NDArray[np.uint8]:
    """Decode an image held in memory, with the same rules and errors as :func:`load_image`.

    Args:
        data: The encoded file contents (PNG, JPEG...).
        name: A label for error messages, e.g. the URL or upload name the bytes came from.
        max_pixels: Largest accepted ``width * height``, checked from the header before decoding.
        background: RGB colour, each in ``0..255``, that transparent pixels are composited over.

    Returns:
        A C-contiguous, writable ``uint8`` array of shape ``(H, W, 3)`` in RGB order.

    Raises:
        ImageReadError: The data is empty, not an image, truncated, corrupt, too large or in an
            unsupported mode. The message contains ``name``.
        ValueError: ``max_pixels`` or ``background`` is invalid.
    """
    _check_options(max_pixels, background)
    if len(data) == 0:
        raise ImageReadError(f"Cannot read image {name!r}: the data is empty (0 bytes).")
    with io.BytesIO(data) as fh:
        return decode_stream(fh, name, max_pixels, background)


def iter_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Iterator[tuple[Path, NDArray[np.uint8] | None, ImageFailure | None]]:
    """Load images one at a time; a bad file yields a failure and the iteration goes on.

    Args:
        paths: Image files, e.g. the first item returned by :func:`expand_paths`.
        max_pixels: Passed to :func:`load_image`.
        background: Passed to :func:`load_image`.

    Yields:
        ``(path, image, None)`` for a file that loaded, ``(path, None, failure)`` for one that did not.

    Raises:
        ValueError: ``max_pixels`` or ``background`` is invalid (raised before the first item).
    """
    _check_options(max_pixels, background)
    for item in paths:
        path = Path(item)
        try:
            image = load_image(path, max_pixels=max_pixels, background=background)
        except ImageReadError as exc:
            logger.debug("skipping %s: %s", path, exc)
            yield path, None, ImageFailure(os.fspath(item), str(exc))
        else:
            yield path, image, None


# --------------------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------------------


def _check_options(max_pixels: int, background: tuple[int, int, int]) -> None:
    """Validate the options shared by the loaders."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}.")
    if (
        not isinstance(background, tuple)
        or len(background) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in background)
    ):
        raise ValueError(f"background must be an (r, g, b) tuple of ints in 0..255, got {background!r}.")
