"""Read image files into RGB ``uint8`` arrays, with clear errors for every way a file can be bad.

This is the lowest input layer of cnnlens: it turns paths (or bytes) into ``(H, W, 3)`` ``uint8`` arrays
and never lets a raw PIL exception escape. Every failure is an
:class:`~cnnlens.errors.ImageReadError` whose message names the file and says what to do.

Conversion rules (applied by :func:`load_image` and :func:`load_image_bytes`):

* **Orientation.** The EXIF orientation tag is applied (:func:`PIL.ImageOps.exif_transpose`), so a
  portrait photo stored sideways comes back upright. A corrupt EXIF block is logged and ignored.
* **Frames.** Animated GIF/PNG/WebP and multi-page TIFF files give their first frame.
* **8-bit modes.** ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr`` and ``HSV`` use PIL's own
  conversion to RGB (CMYK is PIL's naive ``255 - (C + K)`` style conversion, not ICC-managed). ``LAB``
  goes through a LittleCMS Lab -> sRGB transform. Embedded ICC profiles are *not* applied: pixel values
  are read as they are stored, like most deep-learning loaders do.
* **16-bit modes** (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): the full ``0..65535`` range is mapped
  onto ``0..255`` by dividing by 257 with rounding, so 65535 -> 255, 32896 -> 128 and 257 -> 1.
* **32-bit integer mode** ``I``: PIL uses it for 16-bit PGM/PPM and other wide-integer files. When all
  values lie in ``0..65535`` the 16-bit rule above is used (divide by 257). Otherwise (negative or
  larger values) the image is min-max stretched: its minimum becomes 0 and its maximum 255 (a constant
  image is clipped to ``0..255``).
* **Float mode** ``F``: values in ``[0, 1]`` are scaled by 255; otherwise values in ``[0, 255]`` are
  taken as they are (rounded); otherwise the image is min-max stretched over its finite values. NaN
  becomes 0, ``+inf`` 255 and ``-inf`` 0. A constant image outside both ranges is clipped to
  ``0..255``.
* **Alpha.** Images with an alpha channel (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``) or
  with transparency information (a palette with transparent entries, a PNG ``tRNS`` colour key) are
  composited over ``background`` (white by default) in sRGB space:
  ``out = round((rgb * a + background * (255 - a)) / 255)``. Fully transparent pixels become exactly
  ``background``, fully opaque ones keep their colour.

Size guard: the pixel count ``width * height`` is read from the file header and checked against
``max_pixels`` *before* any pixel data is decoded. PIL's own decompression-bomb guard
(:data:`PIL.Image.MAX_IMAGE_PIXELS`) is never modified; its warning is silenced because ``max_pixels``
replaces it, and its error (raised by PIL for images over twice its limit, whatever ``max_pixels``
says) is turned into an :class:`~cnnlens.errors.ImageReadError`.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from cnnlens.errors import ImageReadError
from cnnlens.outputs_dir import MARKER, owned_paths

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

# Suffixes we accept when expanding a directory, kept to common raster photo/bitmap formats. Each is
# kept only if the installed PIL registers a reader for it (AVIF, for instance, needs Pillow >= 11.2 or a
# plugin). Formats that run external programs (EPS via Ghostscript) or that are not pictures (PDF, FITS,
# HDF5, MPEG...) are left out on purpose.
_CANDIDATE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".apng",
    ".gif",
    ".bmp",
    ".dib",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".pfm",
    ".tga",
    ".qoi",
    ".jp2",
    ".j2k",
    ".avif",
)


def _supported_extensions() -> tuple[frozenset[str], tuple[str, ...]]:
    """Return the candidate extensions PIL can open here, and the PIL format ids behind them."""
    Image.init()
    registered = Image.registered_extensions()
    extensions: set[str] = set()
    formats: list[str] = []
    for ext in _CANDIDATE_EXTENSIONS:
        fmt = registered.get(ext)
        if fmt is None or fmt not in Image.OPEN:
            continue
        extensions.add(ext)
        if fmt not in formats:
            formats.append(fmt)
    return frozenset(extensions), tuple(formats)


IMAGE_EXTENSIONS: frozenset[str]
"""Lower-case file suffixes (with the dot) treated as images when a directory is expanded."""
_ALLOWED_FORMATS: tuple[str, ...]
IMAGE_EXTENSIONS, _ALLOWED_FORMATS = _supported_extensions()

# Leading bytes of common formats, used only to word the error for a file PIL cannot identify.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WebP"),
    (b"qoif", 0, "QOI"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"BM", 0, "BMP"),
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"})


@dataclass(frozen=True)
class ImageFailure:
    """An input that could not be turned into an image.

    Attributes:
        path: The path as given (or as found while expanding a directory).
        reason: A readable explanation, including what to do about it.
    """

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


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
        return _decode(fh, name, max_pixels, background)


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
        return _decode(fh, name, max_pixels, background)


def expand_paths(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    exclude: Sequence[str | os.PathLike[str]] = (),
    notes: list[str] | None = None,
) -> tuple[list[Path], list[ImageFailure]]:
    """Turn files and directories into a flat list of image paths.

    Files are kept as given, whatever their extension (a non-image fails later, in :func:`load_image`,
    with a clear message). A directory expands to the files in it whose suffix is in
    :data:`IMAGE_EXTENSIONS` (case-insensitive), sorted by name (case-insensitively); with ``recursive``
    its subdirectories are walked too (sorted by relative path; symlinked directories are not
    followed). Hidden files and directories (name starting with ``.``) found while expanding are
    skipped. Duplicates (same resolved path) are removed, keeping the first occurrence.

    cnnlens output is never read back as input: a folder in ``exclude`` (e.g. the ``--out`` folder) or
    carrying a cnnlens marker (:data:`cnnlens.outputs_dir.MARKER`) found inside a given directory is skipped
    whole; in a given directory that is itself cnnlens output, the files its marker lists are skipped. Entries
    that cannot be used (a symbolic-link loop, a broken link, a symbolic link to a folder, which is not
    followed, a file of another type such as ``.svg``) are skipped too, each with a note.

    Args:
        inputs: Files and directories.
        recursive: Also walk subdirectories of the given directories.
        exclude: Folders whose contents are never listed (output folders).
        notes: When given, one line per kind of skipped entry is appended to it (what, how many, examples).

    Returns:
        ``(paths, failures)``: the image paths in order, and an :class:`ImageFailure` for each input
        that does not exist, cannot be listed, or is a directory with no image file in it.
    """
    paths: list[Path] = []
    failures: list[ImageFailure] = []
    seen: set[Path] = set()
    skipped = _Skipped()
    excluded = {_resolved(Path(e)) for e in exclude}

    def add(candidate: Path) -> None:
        key = _resolved(candidate)
        if key not in seen:
            seen.add(key)
            paths.append(candidate)

    for item in inputs:
        given = Path(item)
        label = os.fspath(item)
        try:
            exists = given.exists()
        except OSError as exc:
            failures.append(ImageFailure(label, f"cannot access the path ({exc.strerror or exc})"))
            continue
        if not exists:
            broken = given.is_symlink()
            failures.append(
                ImageFailure(
                    label,
                    "is a broken symbolic link; fix or remove the link"
                    if broken
                    else "no such file or directory; check the path",
                )
            )
            continue
        if not given.is_dir():
            add(given)
            continue
        try:
            found, has_subdirs = _list_directory(given, recursive=recursive, excluded=excluded, skipped=skipped)
        except OSError as exc:
            failures.append(
                ImageFailure(label, f"cannot list the directory ({exc.strerror or exc}); check permissions")
            )
            continue
        if not found:
            reason = f"directory contains no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            if has_subdirs and not recursive:
                reason += "; it has subdirectories: expand recursively to include them"
            failures.append(ImageFailure(label, reason))
            continue
        for candidate in found:
            add(candidate)
    if notes is not None:
        notes.extend(skipped.lines())
    for line in skipped.lines():
        logger.info("%s", line)
    return paths, failures


class _Skipped:
    """Entries skipped while listing folders, grouped by reason, for one note per reason."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, path: Path) -> None:
        self.by_reason.setdefault(reason, []).append(os.fspath(path))

    def lines(self) -> list[str]:
        out = []
        for reason, items in self.by_reason.items():
            shown = ", ".join(repr(p) for p in items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            out.append(f"skipped {len(items)} {reason}: {shown}")
        return out


def _not_images_reason(names: Sequence[str]) -> str:
    return "file(s) that are not images cnnlens reads (" + ", ".join(sorted(set(names))) + ")"


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


def _resolved(path: Path) -> Path:
    """Return a canonical form of ``path`` for duplicate detection."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # symlink loops and the like
        return Path(os.path.abspath(path))


def _entry_kind(path: Path) -> str:
    """``"dir"``, ``"file"``, ``"dirlink"`` (a symbolic link to a folder), ``"loop"``, ``"broken"`` or ``"other"``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "loop"
        return "broken" if os.path.islink(path) else "other"
    if stat.S_ISDIR(st.st_mode):
        return "dirlink" if os.path.islink(path) else "dir"
    return "file" if stat.S_ISREG(st.st_mode) else "other"


_SKIP_REASONS = {
    "loop": "symbolic link loop(s)",
    "broken": "broken symbolic link(s)",
    "dirlink": "symbolic link(s) to folders (not followed)",
    "other": "entries that are not regular files (devices, pipes, sockets)",
}


def _list_directory(
    directory: Path,
    *,
    recursive: bool,
    excluded: set[Path] | None = None,
    skipped: _Skipped | None = None,
) -> tuple[list[Path], bool]:
    """List the non-hidden image files of ``directory`` sorted by relative path; say if it has subdirs.

    Skipped entries (see :func:`expand_paths`) are recorded in ``skipped``; cnnlens output is left out.
    """
    found: list[tuple[tuple[tuple[str, str], ...], Path]] = []
    has_subdirs = False
    excluded = excluded or set()
    skipped = skipped if skipped is not None else _Skipped()
    own_files, own_patterns = owned_paths(directory)
    top_is_output = bool(own_files or own_patterns) or _resolved(directory) in excluded

    def own(rel: Path) -> bool:
        text = rel.as_posix()
        return text in own_files or any(p.fullmatch(text) for p in own_patterns)

    def output_folder(folder: Path) -> bool:
        return (folder / MARKER).is_file() or _resolved(folder) in excluded

    other: list[str] = []
    other_paths: list[Path] = []

    def consider(candidate: Path, name: str, rel: Path) -> str:
        """Record an image file in ``found``; returns the entry's kind."""
        kind = _entry_kind(candidate)
        if kind == "file":
            if top_is_output and own(rel):
                return kind
            if _is_image_name(name):
                found.append((_sort_key(rel.parts), candidate))
            else:
                other.append(os.path.splitext(name)[1].lower() or "no suffix")
                other_paths.append(candidate)
        elif kind in _SKIP_REASONS and not (kind == "dirlink" and not recursive):
            skipped.add(_SKIP_REASONS[kind], candidate)
        return kind

    if recursive:
        errors: list[OSError] = []
        for root, dirnames, filenames in os.walk(directory, onerror=errors.append):
            root_path = Path(root)
            kept = []
            for d in sorted(dirnames):
                sub = root_path / d
                if d.startswith("."):
                    continue
                if os.path.islink(sub):
                    consider(sub, d, sub.relative_to(directory))
                elif output_folder(sub):
                    skipped.add("cnnlens output folder(s)", sub)
                else:
                    kept.append(d)
            dirnames[:] = kept
            has_subdirs = has_subdirs or bool(kept)
            for filename in filenames:
                if filename.startswith("."):
                    continue
                candidate = root_path / filename
                consider(candidate, filename, candidate.relative_to(directory))
        if errors and Path(errors[0].filename or "") == directory:
            raise errors[0]
        for error in errors:
            skipped.add(f"folder(s) that cannot be listed ({error.strerror or error})", Path(error.filename or "?"))
    else:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                candidate = directory / entry.name
                kind = consider(candidate, entry.name, Path(entry.name))
                if kind in {"dir", "dirlink"}:
                    has_subdirs = True
    if other:
        for p in other_paths:
            skipped.add(_not_images_reason(other), p)
    found.sort(key=lambda pair: pair[0])
    return [p for _, p in found], has_subdirs


def _sort_key(parts: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Sort key for a relative path: case-insensitive by component, ties broken case-sensitively."""
    return tuple((part.casefold(), part) for part in parts)


def _is_image_name(filename: str) -> bool:
    """Tell whether a directory entry should be picked up as an image."""
    return not filename.startswith(".") and os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def _sniff(fh: IO[bytes]) -> str | None:
    """Guess the format from the leading bytes, for error messages only."""
    try:
        fh.seek(0)
        head = fh.read(16)
    except (OSError, ValueError):
        return None
    for magic, offset, fmt in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    return None


def _decode(fh: IO[bytes], name: str, max_pixels: int, background: tuple[int, int, int]) -> NDArray[np.uint8]:
    """Open, check, decode and convert one image from an open binary stream."""
    with warnings.catch_warnings():
        # max_pixels is our own, explicit guard; PIL's warning-level guard would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(fh, formats=_ALLOWED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageReadError(
                f"Refusing to decode image {name!r}: {exc} This is PIL's own decompression-bomb guard "
                "(twice PIL.Image.MAX_IMAGE_PIXELS), which applies whatever max_pixels says. Downscale the "
                "image, or raise PIL.Image.MAX_IMAGE_PIXELS in your program if you trust the file."
            ) from exc
        except UnidentifiedImageError as exc:
            raise _unidentified_error(fh, name) from exc
        except Exception as exc:  # PIL plugins raise many types on a broken header
            raise _corrupt_error(name, exc) from exc
        with opened as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"Refusing to decode image {name!r}: it is {width}x{height} = {width * height:,} pixels, "
                    f"over the limit of max_pixels={max_pixels:,}. Downscale the image, or pass a larger "
                    "max_pixels if you trust the file."
                )
            try:
                im.load()
            except Image.DecompressionBombError as exc:  # some plugins check again while loading
                raise ImageReadError(
                    f"Refusing to decode image {name!r}: {exc} (PIL.Image.MAX_IMAGE_PIXELS guard)"
                ) from exc
            except Exception as exc:  # truncated data, bad compressed stream, codec errors...
                raise _corrupt_error(name, exc) from exc
            upright = _exif_transpose(im, name)
            try:
                return _to_rgb(upright, name, background)
            finally:
                if upright is not im:
                    upright.close()


def _unidentified_error(fh: IO[bytes], name: str) -> ImageReadError:
    """Word the error for a stream PIL could not identify."""
    fmt = _sniff(fh)
    if fmt is not None:
        return ImageReadError(
            f"Cannot read image {name!r}: it starts like a {fmt} file but its header is truncated or "
            "corrupt. Re-download or re-export the file."
        )
    suffix = os.path.splitext(name)[1].lower()
    hint = (
        f" Its extension {suffix!r} is not a supported image format."
        if suffix and suffix not in IMAGE_EXTENSIONS
        else ""
    )
    return ImageReadError(
        f"Cannot read image {name!r}: not an image file, or in a format cnnlens does not read.{hint} "
        f"Supported formats: {', '.join(_ALLOWED_FORMATS)}. Convert it to PNG or JPEG."
    )


def _corrupt_error(name: str, exc: BaseException) -> ImageReadError:
    """Word the error for a stream that failed while being decoded."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in detail.lower():
        return ImageReadError(
            f"Cannot read image {name!r}: the file is truncated (PIL: {detail}). It was probably cut off "
            "during download or copy; re-download or re-export it."
        )
    return ImageReadError(
        f"Cannot read image {name!r}: the image data is corrupt or uses an unsupported encoding "
        f"(PIL {type(exc).__name__}: {detail}). Re-export it as PNG or JPEG."
    )


def _exif_transpose(im: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is logged and the image kept as stored."""
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception as exc:  # corrupt EXIF must not make a readable image unreadable
        logger.warning("ignoring unreadable EXIF orientation of %s: %s", name, exc)
        return im
    return im if upright is None else upright


def _to_rgb(im: Image.Image, name: str, background: tuple[int, int, int]) -> NDArray[np.uint8]:
    """Convert a decoded PIL image to an owned, C-contiguous ``(H, W, 3)`` ``uint8`` RGB array."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray, alpha = _numeric_to_uint8(im)
        rgb = np.repeat(gray[:, :, np.newaxis], 3, axis=2)
        if alpha is not None:
            rgb = _composite(rgb, alpha, background)
        return np.ascontiguousarray(rgb)
    if mode in _ALPHA_MODES or (mode in _RGB_CONVERTIBLE_MODES and "transparency" in im.info):
        # PIL has no direct La -> RGBA conversion; La -> LA un-premultiplies first.
        rgba = np.asarray((im.convert("LA") if mode == "La" else im).convert("RGBA"))
        return _composite(rgba[:, :, :3], rgba[:, :, 3], background)
    if mode == "RGB":
        return np.array(im, dtype=np.uint8, order="C")
    if mode in _RGB_CONVERTIBLE_MODES:
        return np.array(im.convert("RGB"), dtype=np.uint8, order="C")
    if mode == "LAB":
        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        converted = ImageCms.applyTransform(im, transform)
        if converted is None:  # pragma: no cover - only with inPlace=True
            raise ImageReadError(f"Cannot read image {name!r}: Lab to RGB conversion failed.")
        return np.array(converted, dtype=np.uint8, order="C")
    raise ImageReadError(
        f"Cannot read image {name!r}: unsupported pixel mode {mode!r}. Re-export it as 8-bit RGB PNG or JPEG."
    )


def _numeric_to_uint8(im: Image.Image) -> tuple[NDArray[np.uint8], NDArray[np.uint8] | None]:
    """Scale a single-channel ``I;16*``, ``I`` or ``F`` image to ``uint8`` (rules in the module doc).

    Returns:
        The gray image and, when the file declares a transparent value (PNG ``tRNS``), an alpha mask.
    """
    raw = np.asarray(im)
    if im.mode == "F":
        gray = _float_to_uint8(raw.astype(np.float64))
    else:
        values = raw.astype(np.int64)
        if values.size == 0 or (values.min() >= 0 and values.max() <= 65535):
            gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        else:
            gray = _stretch(values.astype(np.float64), float(values.min()), float(values.max()))
    alpha: NDArray[np.uint8] | None = None
    transparency = im.info.get("transparency")
    if isinstance(transparency, (int, float)) and not isinstance(transparency, bool):
        alpha = np.where(raw == transparency, 0, 255).astype(np.uint8)
    return gray, alpha


def _float_to_uint8(values: NDArray[np.float64]) -> NDArray[np.uint8]:
    """Scale a float image: ``[0, 1]`` -> x255, ``[0, 255]`` as is, else min-max over finite values."""
    finite = np.isfinite(values)
    if not finite.any():
        low = high = 0.0
    else:
        low = float(values[finite].min())
        high = float(values[finite].max())
    if low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif high > low:
        return _stretch(values, low, high)
    else:
        scaled = values
    return _round_clip(scaled)


def _stretch(values: NDArray[np.float64], low: float, high: float) -> NDArray[np.uint8]:
    """Map ``low`` -> 0 and ``high`` -> 255 linearly; a constant image is clipped to ``0..255``."""
    if high > low:
        return _round_clip((values - low) * (255.0 / (high - low)))
    return _round_clip(values)


def _round_clip(values: NDArray[np.float64]) -> NDArray[np.uint8]:
    """Round and clip to ``uint8``; NaN -> 0, +inf -> 255, -inf -> 0 (without numpy warnings)."""
    cleaned = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(cleaned), 0, 255).astype(np.uint8)


def _composite(rgb: NDArray[np.uint8], alpha: NDArray[np.uint8], background: tuple[int, int, int]) -> NDArray[np.uint8]:
    """Composite ``rgb`` with straight ``alpha`` over a solid ``background`` colour (sRGB space)."""
    a = alpha.astype(np.uint16)[:, :, np.newaxis]
    colour = rgb.astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    out = (colour * a + bg * (255 - a) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8))
