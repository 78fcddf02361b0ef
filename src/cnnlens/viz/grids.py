"""Figure helpers: labelled image grids with colour bars, exact pixel mosaics, PNG writing.

Figures are built on matplotlib's object API with an Agg canvas (``matplotlib.figure.Figure``), never
through ``pyplot``: no global state, no GUI backend, safe in threads and tests.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from cnnlens.imaging import to_uint8

__all__ = [
    "GridRow",
    "colorize_limits",
    "enlarge",
    "image_grid",
    "mosaic",
    "new_figure",
    "rows_figure",
    "safe_name",
    "save_figure",
]


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A matplotlib figure of ``width x height`` inches with an Agg canvas (no pyplot)."""
    fig = Figure(figsize=(max(width, 1.0), max(height, 1.0)), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int | None = None) -> Path:
    """Write a figure as PNG (parent folders created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi or fig.dpi, bbox_inches="tight", facecolor="white")
    return out


def safe_name(text: str) -> str:
    """A file-name-safe version of a layer name or label.

    Example:
        >>> safe_name("blocks.3@1 / x")
        'blocks.3_1_x'
    """
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", text)).strip("_") or "layer"


def colorize_limits(values: np.ndarray, vmin: float, vmax: float, cmap: str) -> np.ndarray:
    """Colour values with fixed limits: ``cmap((v - vmin) / (vmax - vmin))`` as uint8 ``(..., 3)``."""
    span = vmax - vmin if vmax > vmin else 1.0
    scaled = np.clip((np.nan_to_num(np.asarray(values, dtype=np.float64)) - vmin) / span, 0.0, 1.0)
    rgba = np.asarray(colormaps[cmap](scaled))
    return to_uint8(rgba[..., :3])


def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (every pixel becomes a ``factor^2`` block)."""
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def mosaic(
    tiles: np.ndarray, *, ncols: int | None = None, zoom: int = 1, gap: int = 1, background: int = 255
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles side by side in a uint8 image, pixel-exact (no resampling other than integer zoom).

    Args:
        tiles: ``(N, h, w)`` or ``(N, h, w, 3)``, floats in ``[0, 1]`` or uint8.
        ncols: Tiles per row (default ``ceil(sqrt(N))``).
        zoom: Integer enlargement of each tile.
        gap: Pixels between tiles.
        background: Grey level of the gaps.

    Returns:
        ``(image, positions)``: the uint8 mosaic ``(H, W[, 3])`` and the top-left ``(row, col)`` pixel of
        each tile, so that ``image[r : r + h * zoom : zoom, c : c + w * zoom : zoom] == tile``.

    Example:
        >>> img, pos = mosaic(np.ones((2, 2, 2)), ncols=2, gap=1)
        >>> img.shape, pos
        ((2, 5), [(0, 0), (0, 3)])
    """
    arr = to_uint8(np.asarray(tiles))
    n = int(arr.shape[0])
    if n == 0:
        return np.full((1, 1), background, dtype=np.uint8), []
    cols = ncols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    h, w = int(arr.shape[1]) * zoom, int(arr.shape[2]) * zoom
    shape = (rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, *arr.shape[3:])
    out = np.full(shape, background, dtype=np.uint8)
    positions = []
    for i in range(n):
        r, c = (i // cols) * (h + gap), (i % cols) * (w + gap)
        out[r : r + h, c : c + w] = enlarge(arr[i], zoom)
        positions.append((r, c))
    return out, positions


def _grid_shape(n: int, ncols: int | None) -> tuple[int, int]:
    cols = ncols or (min(n, 8) if n <= 32 else math.ceil(math.sqrt(n * 1.5)))
    return max(1, math.ceil(n / cols)), max(1, cols)


def image_grid(
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    ncols: int | None = None,
    cmap: str | None = None,
    limits: Sequence[tuple[float, float]] | tuple[float, float] | None = None,
    colorbar: str | None = None,
    colorbar_limits: tuple[float, float] | None = None,
    colorbar_cmap: str | None = None,
    title: str | None = None,
    tile_inches: float = 1.4,
    interpolation: str = "nearest",
) -> Figure:
    """A labelled grid of images, with an optional colour bar.

    Args:
        images: RGB ``(h, w, 3)`` images (floats in ``[0, 1]`` or uint8) or scalar maps ``(h, w)``.
        labels: One label per image, drawn above it.
        ncols: Images per row.
        cmap: Colour map for scalar maps.
        limits: Colour limits ``(vmin, vmax)`` shared, or one pair per image.
        colorbar: Label of the colour bar (None: no colour bar).
        colorbar_limits: The bar's range (default: the shared limits, else the first image's).
        colorbar_cmap: The bar's colour map (default ``cmap``, else ``"gray"``).
        title: Figure title.
        tile_inches: Size of one tile.
        interpolation: matplotlib interpolation (``"nearest"`` keeps kernel pixels sharp).

    Returns:
        The figure.
    """
    n = len(images)
    rows, cols = _grid_shape(n, ncols)
    extra = 0.9 if colorbar is not None else 0.0
    fig = new_figure(cols * tile_inches + extra, rows * (tile_inches + 0.25) + (0.5 if title else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False)
    per_image: list[tuple[float, float] | None]
    if limits is None:
        per_image = [None] * n
    elif isinstance(limits, tuple) and len(limits) == 2 and not isinstance(limits[0], tuple):
        per_image = [(float(limits[0]), float(limits[1]))] * n
    else:
        per_image = [(float(a), float(b)) for a, b in limits]
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= n:
            continue
        img = np.asarray(images[i])
        lim = per_image[i]
        if img.ndim == 2:
            vmin, vmax = lim if lim is not None else (float(np.nanmin(img)), float(np.nanmax(img)))
            ax.imshow(img, cmap=cmap or "viridis", vmin=vmin, vmax=vmax, interpolation=interpolation)
        else:
            ax.imshow(to_uint8(img), interpolation=interpolation)
        if labels is not None:
            ax.set_title(labels[i], fontsize=8, pad=2)
    if colorbar is not None:
        bar = colorbar_limits or (per_image[0] if per_image and per_image[0] is not None else (0.0, 1.0))
        mappable = ScalarMappable(norm=Normalize(vmin=bar[0], vmax=bar[1]), cmap=colorbar_cmap or cmap or "gray")
        cb = fig.colorbar(mappable, ax=list(axes.ravel()), fraction=0.04, pad=0.02)
        cb.set_label(colorbar, fontsize=9)
        cb.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


@dataclass(frozen=True)
class GridRow:
    """One row of :func:`rows_figure`: a label, scalar maps, their labels and colour limits."""

    label: str
    maps: Sequence[np.ndarray]
    labels: Sequence[str]
    limits: tuple[float, float]
    cmap: str


def rows_figure(
    rows: Sequence[GridRow],
    *,
    image: np.ndarray | None = None,
    title: str | None = None,
    tile_inches: float = 1.2,
    colorbar: str = "activation",
) -> Figure:
    """Several rows of scalar maps (e.g. one row per layer), each with its own colour bar.

    Args:
        rows: The rows.
        image: An RGB image drawn at the start of every row (the input).
        title: Figure title.
        tile_inches: Size of one tile.
        colorbar: Label of each row's colour bar.

    Returns:
        The figure.
    """
    cols = max((len(r.maps) for r in rows), default=1) + (1 if image is not None else 0)
    fig = new_figure(cols * tile_inches + 1.2, len(rows) * (tile_inches + 0.3) + (0.5 if title else 0.0))
    grid = fig.add_gridspec(max(len(rows), 1), cols + 1, width_ratios=[1.0] * cols + [0.08])
    for r, row in enumerate(rows):
        start = 0
        if image is not None:
            ax = fig.add_subplot(grid[r, 0])
            ax.imshow(to_uint8(image))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(row.label, fontsize=8)
            start = 1
        for i, (m, label) in enumerate(zip(row.maps, row.labels, strict=True)):
            ax = fig.add_subplot(grid[r, start + i])
            ax.imshow(np.asarray(m), cmap=row.cmap, vmin=row.limits[0], vmax=row.limits[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8, pad=2)
            if i == 0 and image is None:
                ax.set_ylabel(row.label, fontsize=8)
        cax = fig.add_subplot(grid[r, cols])
        mappable = ScalarMappable(norm=Normalize(vmin=row.limits[0], vmax=row.limits[1]), cmap=row.cmap)
        cb = fig.colorbar(mappable, cax=cax)
        cb.set_label(colorbar, fontsize=9)
        cb.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
