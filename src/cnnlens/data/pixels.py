"""How an image file becomes an RGB ``uint8`` array: the decoding and conversion rules of cnnlens.

Used by :func:`cnnlens.data.load_image` and :func:`cnnlens.data.load_image_bytes`; never lets a raw PIL
exception escape (every failure is an :class:`~cnnlens.errors.ImageReadError` naming the file).

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

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("LA", (2, 1), (0, 0)).save(buf, "PNG")
    >>> decode_stream(buf, "clear.png", 100, (255, 255, 255))[0, 0].tolist()
    [255, 255, 255]
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import IO

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from cnnlens.errors import ImageReadError

__all__ = ["IMAGE_EXTENSIONS", "decode_stream"]

logger = logging.getLogger(__name__)

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


def decode_stream(fh: IO[bytes], name: str, max_pixels: int, background: tuple[int, int, int]) -> NDArray[np.uint8]:
    """Open, check, decode and convert one image from an open binary stream (``name`` labels errors)."""
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
