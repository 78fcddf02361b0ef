"""The demo report's "filters and feature maps" section: first-conv filters, feature maps, maximised channels.

:func:`demo_section` writes its PNGs under ``out_dir/subdir`` and returns what the report template needs
(title, an HTML intro, and figures as paths relative to ``out_dir`` with captions). It is sized for the
embedded model on 2 CPU cores: the filters and feature maps take a second or two; activation maximisation
runs a few channels for a few dozen steps at a small size, in one batch.
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnlens.models import LoadedModel
from cnnlens.report._env import environment
from cnnlens.views.features import feature_maps
from cnnlens.views.filters import filters, first_conv
from cnnlens.views.maximize import Progress, maximize
from cnnlens.viz.grids import safe_name, save_figure
from cnnlens.viz.views import feature_figure, feature_rows_figure, save_filters, save_maximized

__all__ = ["demo_layers", "demo_predictions_html", "demo_section"]


def _is_block_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) >= 3


def demo_layers(model: LoadedModel | nn.Module) -> list[str]:
    """Layers to show feature maps of: the stem's activation, then three stages from early to late.

    For a timm EfficientNet(-Lite) these are ``bn1`` (stem conv + BN + ReLU6) and ``blocks.i`` for ``i`` at
    about a third, two thirds and the end of the stages; other models fall back to their known layers.
    """
    module = model.module if isinstance(model, LoadedModel) else model
    names = dict(module.named_modules())
    picks: list[str] = []
    if "bn1" in names and "conv_stem" in names:
        picks.append("bn1")
    blocks = names.get("blocks")
    if blocks is not None and _is_block_list(blocks):
        n = len(blocks)
        picks.extend(f"blocks.{i}" for i in dict.fromkeys([n // 3, (2 * n) // 3, n - 1]))
    if len(picks) < 2 and isinstance(model, LoadedModel):
        known = model.spec.known_layers
        picks.extend(v for k in ("mid_block", "last_block", "last_conv") if (v := known.get(k)) and v not in picks)
    if not picks:
        picks.append(first_conv(module))
    return picks


def demo_section(
    model: LoadedModel,
    image: np.ndarray | torch.Tensor,
    out_dir: str | os.PathLike[str],
    *,
    subdir: str = "views",
    layers: list[str] | None = None,
    maximize_layer: str | None = None,
    channels: int = 4,
    steps: int = 48,
    size: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Write the "filters and feature maps" section's figures and describe them for the report.

    1. The first conv's filters as RGB tiles (shared colour scale, sorted by L2 norm).
    2. Feature maps of :func:`demo_layers` for ``image``: one row per layer, top 8 channels by mean
       activation, and a grid of the top 16 of the deepest layer.
    3. Activation maximisation of the ``channels`` channels of ``maximize_layer`` (default: the middle
       feature-map layer) that respond most to ``image``, optimised together for ``steps`` steps at
       ``size`` pixels (Olah et al., "Feature Visualization", Distill 2017).

    Args:
        model: The embedded model (a :class:`~cnnlens.models.LoadedModel`).
        image: One photo, a uint8 ``(H, W, 3)`` array (or a preprocessed tensor).
        out_dir: The report folder; figures go to ``out_dir/subdir``.
        subdir: Sub-folder for this section's files.
        layers: Feature-map layers (default :func:`demo_layers`).
        maximize_layer: Layer of the maximised channels.
        channels: How many channels to maximise.
        steps: Optimisation steps.
        size: Size of the optimised images.
        seed: Seed of the optimisation.
        progress: ``progress(done, total)`` during the optimisation.
        threads: Intra-op threads for the optimisation (restored afterwards; None: torch's setting). One
            by default: its steps are hundreds of small ops, and on the 2-core development machine shared with
            other jobs one thread ran them 12x faster than two (5.7 s instead of 69 s); on an idle machine two
            threads would gain less than 2x.

    Returns:
        ``{"title", "intro", "figures": [{"path", "caption", "alt", "kind"}], "seconds", "files"}`` with
        paths relative to ``out_dir`` (POSIX separators). ``intro`` and ``caption`` are HTML (render them
        with ``| safe``); ``alt`` is the caption as plain text.

    Example:
        >>> from cnnlens.models import load_model
        >>> from cnnlens.data import sample_image
        >>> section = demo_section(load_model("efficientnet_lite0"), sample_image("chelsea"), "out")  # doctest: +SKIP
        >>> [f["path"] for f in section["figures"]][:1]  # doctest: +SKIP
        ['views/filters_conv_stem.png']
    """
    started = time.perf_counter()
    root = Path(out_dir)
    folder = root / subdir
    figures: list[dict[str, str]] = []
    filter_paths = _filters_part(model, folder, root, figures)
    fm, feature_paths = _features_part(model, image, layers or demo_layers(model), folder, root, figures)
    target = maximize_layer or list(fm.layers)[len(fm.layers) // 2]
    if target in fm.layers:
        picked = fm.layers[target].indices[:channels]
    else:
        picked = feature_maps(model, image, target, top_k=channels).layers[target].indices
    result = maximize(model, target, picked, steps=steps, size=size, seed=seed, progress=progress, threads=threads)
    max_paths = save_maximized(result, folder)
    _add(
        figures,
        root,
        max_paths["grid"],
        f"What the {len(picked)} channels of <code>{html.escape(target)}</code> that respond most to this photo "
        f"respond to: images optimised to maximise each channel's mean activation ({steps} steps at {size} px, "
        "Fourier parameterisation with decorrelated colour, jitter/scale/rotate robustness, all channels in one "
        f"batch; {result.seconds:.1f} s).",
        "maximize",
    )
    files: dict[str, str] = {}
    for prefix, group in (("filters", filter_paths), ("features", feature_paths), ("maximize", max_paths)):
        files.update({f"{prefix}:{k}": p.relative_to(root).as_posix() for k, p in group.items()})
    return {
        "title": "Filters and feature maps",
        "intro": environment().get_template("demo_views_intro.html").render(),
        "figures": figures,
        "seconds": time.perf_counter() - started,
        "files": files,
    }


def _add(figures: list[dict[str, str]], root: Path, path: Path, caption: str, kind: str) -> None:
    """Append one figure: its path relative to ``root``, its HTML caption and the caption as plain text."""
    alt = html.unescape(re.sub(r"<[^>]+>", "", caption))
    figures.append({"path": path.relative_to(root).as_posix(), "caption": caption, "alt": alt, "kind": kind})


def _filters_part(model: LoadedModel, folder: Path, root: Path, figures: list[dict[str, str]]) -> dict[str, Path]:
    """The first convolution's filters as RGB tiles, sorted by norm, on one shared scale."""
    fs = filters(model, first_conv(model.module), order="norm", top_k=None, scale="shared")
    filter_paths = save_filters(fs, folder)
    shape = "x".join(map(str, fs.weight_shape))
    _add(
        figures,
        root,
        filter_paths["grid"],
        f"The {len(fs.indices)} filters of the first convolution <code>{html.escape(fs.layer)}</code> ({shape}) as RGB "
        "tiles, sorted by L2 norm, on one shared scale: mid-grey is zero, each colour channel brighter where its "
        "weight is positive: colour-opponent blobs and small edge and gradient detectors; the flat tiles at the end "
        "are filters the training left near zero.",
        "filters",
    )
    return filter_paths


def _features_part(
    model: LoadedModel,
    image: np.ndarray | torch.Tensor,
    chosen: Sequence[str],
    folder: Path,
    root: Path,
    figures: list[dict[str, str]],
) -> tuple[Any, dict[str, Path]]:
    """Feature maps of the photo: one row per stage, then the deepest layer's 16 most active channels."""
    fm = feature_maps(model, image, chosen, rank="activation", top_k=16)
    deepest = list(fm.layers)[-1]
    feature_paths = {
        "rows": save_figure(feature_rows_figure(fm), folder / "features_rows.png"),
        f"grid:{deepest}": save_figure(
            feature_figure(fm.layers[deepest], fm=fm), folder / f"features_{safe_name(deepest)}.png"
        ),
    }
    if len(fm.layers) > 1:
        _add(
            figures,
            root,
            feature_paths["rows"],
            "Feature maps of the same photo, one row per stage from the stem to the last block: the 8 channels "
            "with the highest mean activation, each row on its own shared colour scale. Early maps still show the "
            "picture (edges, colours); later ones are coarse and abstract.",
            "features",
        )
    _add(
        figures,
        root,
        feature_paths[f"grid:{deepest}"],
        f"The 16 most active channels of <code>{html.escape(deepest)}</code>, labelled with their index and mean "
        "activation, on one shared colour scale.",
        "features",
    )
    return fm, feature_paths


def demo_predictions_html(
    *,
    model: str,
    weights: str,
    layers: Sequence[str],
    strides: Mapping[str, int | str | None],
    photos: Sequence[str],
    entries: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    methods: Sequence[tuple[str, str]] = (("gradcam", "Grad-CAM"), ("gradcampp", "Grad-CAM++")),
    files_prefix: str = "explain/",
    views: Mapping[str, Any] | None = None,
    cmap: str = "jet",
) -> str:
    """The demo report's part 1 as HTML: one row per photo with its top-3 and every (layer, method) overlay.

    Rendered from ``report/templates/demo_part1.html`` (autoescaped: class names are text, never markup);
    thumbnails are all 160x160, a colour bar of ``cmap`` explains the overlays, the weights source carries no
    machine path (:func:`cnnlens.display.scrub_paths`), and the forward-views section (:func:`demo_section`) is
    appended when given.

    Args:
        model: Model name.
        weights: Its weights source (paths are made public).
        layers: The explained layers, the default one first, then the earlier one.
        strides: Layer -> stride, for the intro.
        photos: Photo names, one row each.
        entries: Result entries of :meth:`cnnlens.explanation.ExplanationSet.write_files`.
        predictions: Per-photo top-k predictions (``{"image", "top": [{"name", "probability"}]}``).
        methods: ``(id, title)`` of the columns' methods.
        files_prefix: Path from the report to the entries' folder.
        views: The dict :func:`demo_section` returns, or None.
        cmap: The overlays' colour map.

    Returns:
        HTML (trusted: render with ``| safe``).
    """
    from cnnlens.display import scrub_paths

    columns = [{"id": m, "title": title, "layer": ly} for ly in layers for m, title in methods]
    top = {str(p["image"]): list(p.get("top", []))[:3] for p in predictions}
    rows = []
    for name in photos:
        cells = []
        for col in columns:
            e = next(
                (r for r in entries if r["image"] == name and r["layer"] == col["layer"] and r["method"] == col["id"]),
                None,
            )
            overlay = e["files"].get("overlay") if e else None
            cells.append(f"{files_prefix}{overlay}" if overlay else "")
        rows.append({"name": name, "top": top.get(name, []), "cells": cells})
    early = layers[1] if len(layers) > 1 else layers[0]
    return (
        environment()
        .get_template("demo_part1.html")
        .render(
            model=model,
            weights=scrub_paths(weights),
            layer=layers[0],
            stride=strides.get(layers[0], "?"),
            early=early,
            early_stride=strides.get(early, "?"),
            columns=columns,
            rows=rows,
            views=views,
            cmap=cmap,
        )
    )
