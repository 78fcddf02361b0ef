"""Drawing the forward views: filter grids, feature-map grids and maximised images, as figures and PNGs.

The data comes from :mod:`cnnlens.views`; nothing here computes anything about the model. Each ``save_*``
function writes PNGs into a folder and returns their paths by role, for the CLI and the demo report.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnlens.imaging import save_png, to_uint8
from cnnlens.views.features import FeatureMaps, LayerFeatures
from cnnlens.views.filters import FilterSet
from cnnlens.views.maximize import MaximizeResult
from cnnlens.viz.grids import (
    GridRow,
    colorize_limits,
    enlarge,
    image_grid,
    mosaic,
    rows_figure,
    safe_name,
    save_figure,
)

__all__ = [
    "DIVERGING",
    "SEQUENTIAL",
    "feature_cmap",
    "feature_figure",
    "feature_rows_figure",
    "filter_figure",
    "filter_mosaic",
    "maximize_figure",
    "save_features",
    "save_filters",
    "save_maximized",
]

DIVERGING = "RdBu_r"
"""Colour map for signed values (weights, signed activations): blue negative, white zero, red positive."""
SEQUENTIAL = "viridis"
"""Colour map for non-negative activations."""


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)


def filter_mosaic(fs: FilterSet, *, zoom: int = 8, ncols: int | None = None, cmap: str = DIVERGING) -> np.ndarray:
    """The tiles of an ``rgb`` or ``mean`` filter set as one pixel-exact uint8 image.

    ``rgb`` tiles show :meth:`FilterSet.display` as colours; ``mean`` tiles colour it with ``cmap``.
    Tile ``i`` (filter ``fs.indices[i]``) sits at the position :func:`cnnlens.viz.grids.mosaic` reports.
    """
    display = _np(fs.display())
    if fs.view == "rgb":
        tiles = display.transpose(0, 2, 3, 1)
    elif fs.view == "mean":
        tiles = colorize_limits(display, 0.0, 1.0, cmap)
    else:
        raise ValueError(f"filter_mosaic draws 'rgb' and 'mean' views; this filter set is {fs.view!r}.")
    image, _ = mosaic(tiles, ncols=ncols, zoom=zoom)
    return image


def filter_figure(
    fs: FilterSet, *, ncols: int | None = None, cmap: str = DIVERGING, title: str | None = None
) -> Figure:
    """A labelled grid of a conv's filters with a colour bar (see :func:`cnnlens.views.filters.filters`)."""
    shape = "x".join(str(s) for s in fs.weight_shape)
    kind = "depthwise" if fs.depthwise else f"groups={fs.groups}" if fs.groups > 1 else "dense"
    scale = "shared scale" if fs.scale == "shared" else "per-tile scale"
    head = title or f"{fs.layer}: {fs.view} view of {len(fs.indices)} filters ({shape}, {kind}), {scale}, by {fs.order}"
    labels = fs.labels()
    lim = float(fs.limits[0]) if len(fs.limits) else 1.0
    if fs.scale == "per_tile":
        labels = [f"{label}\n±{float(m):.2g}" for label, m in zip(labels, fs.limits, strict=True)]
        bar_label, bar = "weight / per-tile max |w|", (-1.0, 1.0)
    else:
        bar_label, bar = "weight", (-lim, lim)
    if fs.view == "rgb":
        images = list(_np(fs.display()).transpose(0, 2, 3, 1))
        return image_grid(
            images,
            labels,
            ncols=ncols,
            colorbar=bar_label + " (each of R, G, B)",
            colorbar_limits=bar,
            colorbar_cmap="gray",
            title=head,
        )
    if fs.view == "mean":
        tiles = _np(fs.tiles)
        limits = [(-float(m), float(m)) for m in fs.limits]
        return image_grid(
            list(tiles),
            labels,
            ncols=ncols,
            cmap=cmap,
            limits=limits,
            colorbar="mean " + bar_label + " over input channels",
            colorbar_limits=bar if fs.scale == "per_tile" else (-lim, lim),
            title=head,
        )
    if fs.view == "slices":
        tiles = _np(fs.tiles)
        images, slice_labels, limits = [], [], []
        for i, k in enumerate(fs.indices):
            m = float(fs.limits[i])
            for j, c in enumerate(fs.input_channels[i]):
                images.append(tiles[i, j])
                slice_labels.append(f"#{k} in {c}")
                limits.append((-m, m))
        return image_grid(
            images,
            slice_labels,
            ncols=int(tiles.shape[1]),
            cmap=cmap,
            limits=limits,
            colorbar=bar_label,
            colorbar_limits=bar if fs.scale == "per_tile" else (-lim, lim),
            title=head + " (one row per filter, its input slices)",
        )
    # matrix: one heat map (filters x input channels)
    matrix = _np(fs.display()) * 2.0 - 1.0 if fs.scale == "per_tile" else _np(fs.tiles)
    fig = image_grid(
        [matrix],
        None,
        ncols=1,
        cmap=cmap,
        limits=(-1.0, 1.0) if fs.scale == "per_tile" else (-lim, lim),
        colorbar=bar_label,
        colorbar_limits=bar if fs.scale == "per_tile" else (-lim, lim),
        title=head + " (rows: filters, columns: input channels)",
        tile_inches=max(2.5, min(8.0, matrix.shape[1] / 16)),
    )
    ax = fig.axes[0]
    ax.set_axis_on()
    step = max(1, len(fs.indices) // 16)
    ax.set_yticks(range(0, len(fs.indices), step))
    ax.set_yticklabels([str(k) for k in fs.indices[::step]], fontsize=8)
    ax.set_xlabel("input channel", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    return fig


def feature_cmap(lf: LayerFeatures) -> str:
    """Diverging colour map for signed activations, sequential otherwise."""
    return DIVERGING if lf.signed else SEQUENTIAL


def _rank_text(lf: LayerFeatures, fm: FeatureMaps | None) -> str:
    if lf.rank == "gradcam":
        klass = "" if fm is None or fm.target_class is None else f" for class {fm.target_class}"
        name = "" if fm is None or fm.class_name is None else f" ({fm.class_name})"
        return f"ranked by Grad-CAM weight{klass}{name}"
    return "ranked by mean activation" if lf.rank == "activation" else "in index order (mean activation shown)"


def feature_figure(
    lf: LayerFeatures, *, fm: FeatureMaps | None = None, ncols: int | None = None, title: str | None = None
) -> Figure:
    """A labelled grid of one layer's top feature maps with a colour bar (shared scale by default)."""
    shape = "x".join(str(s) for s in lf.activation.shape)
    scale = "shared scale" if lf.scale == "shared" else "per-map scale"
    head = title or f"{lf.layer} ({shape}): top {len(lf.indices)} channels {_rank_text(lf, fm)}, {scale}"
    limits = [(float(a), float(b)) for a, b in _np(lf.limits)]
    shared = lf.scale == "shared" and bool(limits)
    return image_grid(
        list(_np(lf.maps)),
        lf.labels(),
        ncols=ncols,
        cmap=feature_cmap(lf),
        limits=limits,
        colorbar="activation" if shared else "activation (limits of the first map)",
        colorbar_limits=limits[0] if limits else (0.0, 1.0),
        title=head,
    )


def feature_rows_figure(fm: FeatureMaps, *, top_k: int | None = 8, title: str | None = None) -> Figure:
    """One row per layer (the input first): watch the image turn abstract with depth."""
    rows = []
    for lf in fm.layers.values():
        k = len(lf.indices) if top_k is None else min(top_k, len(lf.indices))
        maps = list(_np(lf.maps[:k]))
        lims = _np(lf.limits[:k])
        lo, hi = (float(lims[:, 0].min()), float(lims[:, 1].max())) if k else (0.0, 1.0)
        shape = "x".join(str(s) for s in lf.activation.shape[1:])
        rows.append(GridRow(f"{lf.layer}\n{shape}", maps, lf.labels()[:k], (lo, hi), feature_cmap(lf)))
    first = next(iter(fm.layers.values()), None)
    text = _rank_text(first, fm) if first is not None else ""
    return rows_figure(rows, image=_np(fm.image), title=title or f"feature maps by layer, {text}")


def maximize_figure(res: MaximizeResult, *, ncols: int | None = None, title: str | None = None) -> Figure:
    """A labelled grid of maximised images (label: channel or class, and its final objective value)."""
    labels = [f"{label}\nS={float(s):.3g}" for label, s in zip(res.labels, res.scores, strict=True)]
    images = [_np(res.images[i]).transpose(1, 2, 0) for i in range(len(res.keys))]
    steps = res.settings.get("steps", "?")
    head = title or f"activation maximisation: {res.objective} ({steps} steps, seed {res.settings.get('seed', '?')})"
    return image_grid(images, labels, ncols=ncols, title=head, tile_inches=1.6, interpolation="antialiased")


def save_filters(fs: FilterSet, out_dir: str | os.PathLike[str], *, name: str | None = None) -> dict[str, Path]:
    """Write the filter grid (``filters_<layer>.png``) and, for ``rgb``/``mean``, the exact mosaic.

    Returns:
        ``{"grid": path, "mosaic": path}`` (no mosaic for ``slices``/``matrix`` views).
    """
    out = Path(out_dir)
    stem = name or f"filters_{safe_name(fs.layer)}"
    paths = {"grid": save_figure(filter_figure(fs), out / f"{stem}.png")}
    if fs.view in ("rgb", "mean"):
        paths["mosaic"] = save_png(out / f"{stem}_tiles.png", filter_mosaic(fs))
    return paths


def _map_png(values: np.ndarray, limits: tuple[float, float], cmap: str, min_size: int = 112) -> np.ndarray:
    image = colorize_limits(values, limits[0], limits[1], cmap)
    factor = max(1, -(-min_size // max(1, min(values.shape[:2]))))
    return enlarge(image, factor)


def save_features(fm: FeatureMaps, out_dir: str | os.PathLike[str], *, individual: bool = True) -> dict[str, Path]:
    """Write one grid per layer, a rows figure for several layers, and each shown map as its own PNG.

    Individual maps (``features_<layer>/c<k>.png``) are coloured with the layer's colour limits and
    enlarged by an integer factor (nearest neighbour) to at least 112 pixels.

    Returns:
        Paths by role: ``"grid:<layer>"``, ``"rows"``, ``"map:<layer>:<k>"``, ``"input"``.
    """
    out = Path(out_dir)
    paths: dict[str, Path] = {"input": save_png(out / "features_input.png", _np(fm.image))}
    for key, lf in fm.layers.items():
        stem = f"features_{safe_name(key)}"
        paths[f"grid:{key}"] = save_figure(feature_figure(lf, fm=fm), out / f"{stem}.png")
        if individual:
            cmap = feature_cmap(lf)
            for i, k in enumerate(lf.indices):
                lim = (float(lf.limits[i, 0]), float(lf.limits[i, 1]))
                paths[f"map:{key}:{k}"] = save_png(out / stem / f"c{k}.png", _map_png(_np(lf.maps[i]), lim, cmap))
    if len(fm.layers) > 1:
        paths["rows"] = save_figure(feature_rows_figure(fm), out / "features_rows.png")
    return paths


def save_maximized(res: MaximizeResult, out_dir: str | os.PathLike[str], *, name: str | None = None) -> dict[str, Path]:
    """Write the labelled grid and every optimised image (``<stem>/<key>.png``).

    Returns:
        Paths by role: ``"grid"`` and ``"image:<key>"``.
    """
    out = Path(out_dir)
    stem = name or ("maximize_" + (safe_name(res.layer) if res.layer else "classes"))
    paths = {"grid": save_figure(maximize_figure(res), out / f"{stem}.png")}
    for i, key in enumerate(res.keys):
        paths[f"image:{key}"] = save_png(out / stem / f"{key}.png", to_uint8(_np(res.images[i]).transpose(1, 2, 0)))
    return paths
