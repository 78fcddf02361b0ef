"""PNG and NPY encoding for the API: overlays, heat maps, signed maps, mosaics."""

from __future__ import annotations

import io

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from cnnlens.imaging import colorize, overlay
from cnnlens.serve.config import ApiError

__all__ = ["COLORMAPS", "DIVERGING", "check_colormap", "heatmap_png", "npy_bytes", "overlay_png", "png", "signed_png"]

COLORMAPS: tuple[str, ...] = ("jet", "viridis", "inferno", "magma", "plasma", "turbo", "gray", "hot", "cividis")
"""Colour maps the page offers (matplotlib names)."""

DIVERGING = "RdBu_r"
"""The colour map of signed maps: blue negative, white zero, red positive."""


def png(array: NDArray[np.uint8]) -> bytes:
    """Encode a uint8 ``(H, W)`` or ``(H, W, 3)`` array as PNG (fast compression: these are transient)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def check_colormap(name: str) -> str:
    """Refuse a colour map the page does not offer.

    Raises:
        ApiError: ``bad_colormap`` (400).
    """
    if name not in COLORMAPS:
        raise ApiError("bad_colormap", f"unknown colour map {name!r}.", f"use one of: {', '.join(COLORMAPS)}.")
    return name


def check_opacity(value: float) -> float:
    """Refuse an opacity outside [0, 1] (or NaN).

    Raises:
        ApiError: ``bad_opacity`` (400).
    """
    if not 0.0 <= value <= 1.0:
        raise ApiError("bad_opacity", f"opacity must be in [0, 1], got {value!r}.", "send e.g. opacity=0.5.")
    return value


def overlay_png(image: NDArray[np.uint8], map01: NDArray[np.float32], colormap: str, opacity: float) -> bytes:
    """The map coloured with ``colormap`` over the image, blended with ``opacity``."""
    return png(overlay(image, map01, alpha=check_opacity(opacity), cmap=check_colormap(colormap)))


def heatmap_png(map01: NDArray[np.float32], colormap: str) -> bytes:
    """The map alone, coloured with ``colormap``."""
    return png(colorize(map01, check_colormap(colormap)))


def signed_png(signed: NDArray[np.float32]) -> bytes:
    """The raw signed map on a diverging colour map centred at 0 (``0.5 + v / (2 max|v|)``)."""
    peak = float(np.abs(signed).max()) if signed.size else 0.0
    values = np.full_like(signed, 0.5) if peak == 0.0 or not np.isfinite(peak) else 0.5 + signed / (2.0 * peak)
    return png(colorize(values.astype(np.float32), DIVERGING))


def npy_bytes(array: NDArray[np.float32]) -> bytes:
    """A float32 array as a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()
