"""Pixel-level rendering helpers: colour maps, overlays and PNG writing (numpy, PIL; matplotlib when colouring).

This module is a leaf: it imports nothing from cnnlens, so both the core's file writing and the viz/report
layers can use it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["clip_percentile", "colorize", "overlay", "overlay_weighted", "save_png", "to_uint8"]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a float image in [0, 1] (H, W[, C]) to uint8 (values outside are clipped)."""
    if image.dtype == np.uint8:
        return image
    out: np.ndarray = (np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=32)
def _lut(cmap: str) -> np.ndarray:
    """The colour map's lookup table as uint8 ``(N, 3)``: row ``i`` is the colour of bin ``i``."""
    from matplotlib import colormaps  # only when a map is coloured: ``import cnnlens`` stays light

    cm = colormaps[cmap]
    table: np.ndarray = to_uint8(np.asarray(cm(np.arange(cm.N)))[:, :3])
    table.setflags(write=False)
    return table


def colorize(map01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour a map in [0, 1] (H, W) with a matplotlib colour map; returns uint8 (H, W, 3).

    A lookup in the colour map's own table, with matplotlib's binning (``bin = floor(x * N)``, 1.0 in the last
    bin): the same colours as ``to_uint8(colormaps[cmap](x)[..., :3])``, without the float RGBA image.

    Example:
        >>> colorize(np.zeros((2, 2)), "gray")[0, 0].tolist()
        [0, 0, 0]
    """
    table = _lut(cmap)
    n = table.shape[0]
    values = np.asarray(map01)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    scaled = values * values.dtype.type(n)  # in the map's own precision, as matplotlib does
    np.nan_to_num(scaled, copy=False, nan=0.0)
    np.clip(scaled, 0, n - 1, out=scaled)
    out: np.ndarray = np.take(table, scaled.astype(np.intp), axis=0)  # 3x faster than table[index]
    return out


def overlay(image: np.ndarray, map01: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a coloured map over an RGB uint8 image of the same height and width.

    Formula: ``out = (1 - alpha) * image + alpha * colorize(map)``.
    """
    if image.shape[:2] != map01.shape[:2]:
        raise ValueError(
            f"overlay needs the image and the map at the same size, got {image.shape[:2]} and {map01.shape[:2]}."
        )
    heat = colorize(map01, cmap).astype(np.float32)
    blend = image[..., :3].astype(np.float32)
    blend *= 1.0 - alpha
    blend += alpha * heat
    blend += 0.5
    out: np.ndarray = np.clip(blend, 0, 255, out=blend).astype(np.uint8)
    return out


def clip_percentile(map01: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Rescale a map in [0, 1] so that its ``percentile`` becomes 1 (values above clip): how sparse maps are shown.

    Example:
        >>> clip_percentile(np.array([0.0, 0.25, 0.5, 0.5, 1.0]), 50).tolist()
        [0.0, 0.5, 1.0, 1.0, 1.0]
    """
    values = np.clip(np.nan_to_num(np.asarray(map01, dtype=np.float32)), 0.0, 1.0)
    top = float(np.percentile(values, percentile)) if values.size else 0.0
    if top > 0:
        values = np.clip(values / np.float32(top), 0.0, 1.0)
    return values


def overlay_weighted(
    image: np.ndarray, map01: np.ndarray, *, alpha: float = 0.9, cmap: str = "inferno", percentile: float = 99.0
) -> np.ndarray:
    """Blend a coloured map over an image with opacity proportional to the map: for sparse pixel attributions.

    Formula: ``m = clip(map / q, 0, 1)`` with ``q`` the map's ``percentile`` (a few extreme pixels would
    otherwise make everything else invisible), then ``out = (1 - alpha m) * image + alpha m * colorize(m)``.
    Where the map is zero the photo shows unchanged, so a map that is zero almost everywhere (saliency, guided
    backprop) reads as bright marks on the photo, not as a uniform dark tint of the colour map's low end.

    Example:
        >>> overlay_weighted(np.full((1, 1, 3), 200, np.uint8), np.zeros((1, 1)))[0, 0].tolist()
        [200, 200, 200]
    """
    if image.shape[:2] != map01.shape[:2]:
        raise ValueError(
            f"overlay needs the image and the map at the same size, got {image.shape[:2]} and {map01.shape[:2]}."
        )
    values = clip_percentile(map01, percentile)
    weight = values[..., None] * alpha
    heat = colorize(values, cmap).astype(np.float32)
    blend = image[..., :3].astype(np.float32) * (1.0 - weight) + heat * weight + 0.5
    out: np.ndarray = np.clip(blend, 0, 255).astype(np.uint8)
    return out


def save_png(path: str | os.PathLike[str], array: np.ndarray, *, text: Mapping[str, str] | None = None) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG with optional text metadata; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    Image.fromarray(to_uint8(array)).save(out, format="PNG", pnginfo=info)
    return out
