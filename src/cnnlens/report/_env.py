"""The one jinja2 environment of the reports, and the helpers every template shares.

All HTML cnnlens writes (the explain index, the demo, the study report, the run report) is rendered from
``cnnlens/report/templates`` through :func:`environment`; no other module builds a jinja environment.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from cnnlens.display import CAM_CMAP, method_traits

__all__ = ["colorbar_html", "environment", "result_caption"]


def _css_gradient(cmap: str, stops: int = 11) -> str:
    from matplotlib import colormaps  # the report layer draws with matplotlib's colour maps

    cm = colormaps[cmap]
    parts = []
    for i in range(stops):
        r, g, b, _ = cm(i / (stops - 1))
        parts.append(f"rgb({round(255 * r)},{round(255 * g)},{round(255 * b)}) {100 * i / (stops - 1):.0f}%")
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


def colorbar_html(cmap: str = CAM_CMAP, *, low: str = "0", high: str = "1", label: str = "") -> Markup:
    """A horizontal colour bar (an HTML gradient built from the matplotlib colour map ``cmap``) with end labels.

    Used under overlays and heat maps: maps are normalised per image to [0, 1], so the ends read "0" (no
    evidence) and "1" (the map's maximum in this image).

    Example:
        >>> "linear-gradient" in colorbar_html("jet", label="map value")
        True
    """
    return Markup(
        '<div class="cbar"><span>{low}</span><span class="cbar-bar" style="background: {grad}"></span>'
        "<span>{high}</span>{label}</div>"
    ).format(
        low=low,
        high=high,
        grad=Markup(_css_gradient(cmap)),
        label=Markup(" <span class='cbar-label'>{}</span>").format(label) if label else "",
    )


def result_caption(result: Mapping[str, Any]) -> Markup:
    """The caption line of one map: method (with any non-default options) and its layer, or "input gradients".

    Pixel attributions (saliency, guided backprop, Integrated Gradients...) do not use the layer they were
    listed under: they read "input gradients"; class-independent maps (Eigen-CAM) say so.
    """
    traits = method_traits(str(result.get("method", "")))
    input_level = bool(result.get("input_level", traits.input_level))
    options = result.get("options") or {}
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    where = Markup("input gradients") if input_level else Markup("<code>{}</code>").format(result.get("layer", ""))
    text = Markup("<strong>{}</strong>").format(result.get("title", result.get("method", "")))
    if opts:
        text += Markup(" <span class='opts'>({})</span>").format(opts)
    return text + Markup(" · ") + where


@functools.cache
def environment() -> Environment:
    """The one jinja2 environment of cnnlens: every report's template, autoescaped HTML, shared globals.

    Globals: ``colorbar`` (:func:`colorbar_html`) and ``caption`` (:func:`result_caption`).
    """
    env = Environment(loader=PackageLoader("cnnlens.report", "templates"), autoescape=select_autoescape(["html"]))
    env.globals["colorbar"] = colorbar_html
    env.globals["caption"] = result_caption
    return env
