"""How results show themselves in Jupyter and in scripts: overlay tiles, inline HTML, a matplotlib figure.

:meth:`cnnlens.explanation.Explanation._repr_html_` and :meth:`cnnlens.explanation.ExplanationSet._repr_html_`
(what Jupyter displays for a result on the last line of a cell) and their ``show()``/``figure()`` are built here:

- :func:`overlay_tiles`: one :class:`Tile` per map (image x method x layer x target, in that order), the map
  drawn over its image exactly as :meth:`cnnlens.explanation.ExplanationSet.write_files` draws the
  ``.overlay.png`` files (CAMs in ``jet`` at opacity 0.5, pixel attributions weighted by value in ``inferno``;
  a coloured heat map when the result holds no images; the middle depth slice of a volume).
- :func:`explanations_html`: a grid of inline base64 PNGs, each captioned with its image, class, score, method
  and layer, at most ``limit`` of them followed by a "N more maps" line. No file and no network involved.
- :func:`draw_tiles`: the same grid as a matplotlib figure (``show()`` in scripts), made without pyplot unless
  asked, so it works under any backend.

Pixels come from :mod:`cnnlens.imaging` (numpy and PIL); matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cnnlens.display import CAM_CMAP, SPARSE_CMAP, method_traits
from cnnlens.imaging import clip_percentile, colorize, overlay, overlay_weighted

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cnnlens.explanation import Explanation

__all__ = [
    "DISPLAY_LIMIT",
    "TILE_SIZE",
    "Tile",
    "draw_tiles",
    "explanations_html",
    "overlay_tiles",
    "png_base64",
    "show_tiles",
]

DISPLAY_LIMIT = 12
"""How many maps a result shows inline before the "N more maps" line."""

TILE_SIZE = 256
"""Longest side, in pixels, of an inline tile: larger maps are shrunk (never enlarged) for display."""


@dataclass(frozen=True)
class Tile:
    """One map drawn for display.

    Attributes:
        picture: ``(H, W, 3)`` uint8: the map over its image (or the coloured map when there is no image).
        image: The image's name.
        method: The method id.
        title: The method's display name.
        layer: The layer key.
        label: The explained class (``"282 tiger cat"``) or target description.
        score: The explained score.
        degenerate: The map was constant or all zero (drawn as zeros).
    """

    picture: np.ndarray
    image: str
    method: str
    title: str
    layer: str
    label: str
    score: float
    degenerate: bool

    def caption(self) -> str:
        """``chelsea: 282 tiger cat (9.53)``: the image, the class and its score."""
        flag = ", degenerate" if self.degenerate else ""
        return f"{self.image}: {self.label} ({self.score:.3g}{flag})"


def _count(items: Sequence[Explanation]) -> int:
    return sum(e.batch_size * e.num_targets for e in items)


def _shrink(picture: np.ndarray, size: int) -> np.ndarray:
    h, w = picture.shape[:2]
    if max(h, w) <= size:
        return picture
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(picture).resize(shape, Image.Resampling.LANCZOS))


def _picture(e: Explanation, b: int, t: int) -> np.ndarray:
    maps = e.maps[b, t]
    image = e.images[b] if e.images is not None else None
    if e.depth_slice is not None:
        maps = maps[e.depth_slice]
    map01 = maps.detach().float().cpu().numpy()
    sparse = method_traits(e.method).sparse
    if image is None:
        return colorize(clip_percentile(map01) if sparse else map01, SPARSE_CMAP if sparse else CAM_CMAP)
    pixels = image.detach().cpu().numpy()
    if sparse:
        return overlay_weighted(pixels, map01, cmap=SPARSE_CMAP)
    return overlay(pixels, map01, alpha=0.5, cmap=CAM_CMAP)


def _order(items: Sequence[Explanation]) -> Iterable[tuple[Explanation, int, int]]:
    """Every (result, image, target), image by image: one image's methods and layers side by side."""
    images = max((e.batch_size for e in items), default=0)
    for b in range(images):
        for e in items:
            if b < e.batch_size:
                for t in range(e.num_targets):
                    yield e, b, t


def overlay_tiles(items: Sequence[Explanation], limit: int | None = DISPLAY_LIMIT, size: int = TILE_SIZE) -> list[Tile]:
    """The first ``limit`` maps of ``items`` (None: all), drawn over their images, image by image.

    Args:
        items: Results to draw (one :class:`~cnnlens.explanation.Explanation` or a whole set).
        limit: Most tiles drawn; the rest are only counted by the callers.
        size: Longest side of a tile in pixels (larger maps are shrunk).

    Returns:
        One :class:`Tile` per drawn map.
    """
    tiles: list[Tile] = []
    for e, b, t in _order(items):
        if limit is not None and len(tiles) >= limit:
            break
        name = e.image_names[b] if b < len(e.image_names) else f"image{b:04d}"
        tiles.append(
            Tile(
                picture=_shrink(_picture(e, b, t), size),
                image=name,
                method=e.method,
                title=e.title,
                layer=e.layer,
                label=e.class_label(b, t),
                score=float(e.scores[b, t]),
                degenerate=bool(e.degenerate[b, t]),
            )
        )
    return tiles


def png_base64(picture: np.ndarray) -> str:
    """A uint8 picture as base64 PNG text, for a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def explanations_html(
    items: Sequence[Explanation], *, heading: str, limit: int = DISPLAY_LIMIT, notes: Sequence[str] = ()
) -> str:
    """An HTML grid of the first ``limit`` maps (inline PNGs with captions), then "N more maps" when capped.

    Args:
        items: The results.
        heading: The first line (what the results are).
        limit: Most maps shown.
        notes: Extra lines under the heading (predictions), shown as they are (escaped).

    Returns:
        Self-contained HTML (no file, no script, no external resource).
    """
    tiles = overlay_tiles(items, limit)
    figures = []
    for tile in tiles:
        h, w = tile.picture.shape[:2]
        alt = f"{tile.title} at {tile.layer}, {tile.caption()}"
        figures.append(
            '<figure style="margin:0;display:inline-block;vertical-align:top;max-width:'
            f'{w}px"><img src="data:image/png;base64,{png_base64(tile.picture)}" width="{w}" height="{h}" '
            f'alt="{html.escape(alt)}"><figcaption style="font-size:12px;line-height:1.3">'
            f"<b>{html.escape(tile.title)}</b> @ <code>{html.escape(tile.layer)}</code><br>"
            f"{html.escape(tile.caption())}</figcaption></figure>"
        )
    total = _count(items)
    more = (
        f'<div class="cnnlens-more">{total - len(tiles)} more maps not shown (of {total}): '
        f"use .show(limit={total}) or save()</div>"
        if total > len(tiles)
        else ""
    )
    lines = "".join(f"<div>{html.escape(n)}</div>" for n in notes)
    return (
        '<div class="cnnlens-explanations">'
        f"<div><b>{html.escape(heading)}</b></div>{lines}"
        f'<div style="display:flex;flex-wrap:wrap;gap:8px;margin-top:4px">{"".join(figures)}</div>{more}</div>'
    )


def draw_tiles(
    items: Sequence[Explanation],
    *,
    limit: int = DISPLAY_LIMIT,
    columns: int = 4,
    pyplot: bool = False,
    **figure_kwargs: Any,
) -> Figure:
    """Draw the first ``limit`` maps as a matplotlib figure: a grid of overlays titled like the HTML captions.

    Args:
        items: The results.
        limit: Most maps drawn (a last line says how many were left out).
        columns: Tiles per row.
        pyplot: Make the figure with :func:`matplotlib.pyplot.figure` (so ``plt.show()`` and Jupyter's inline
            backend see it); otherwise a bare :class:`matplotlib.figure.Figure`, safe under any backend.
        **figure_kwargs: Passed to the figure (``figsize``, ``dpi``).

    Returns:
        The figure.
    """
    tiles = overlay_tiles(items, limit)
    rows = max(1, -(-len(tiles) // max(1, columns)))
    cols = max(1, min(columns, len(tiles)))
    figure_kwargs.setdefault("figsize", (3.0 * cols, 3.2 * rows))
    if pyplot:
        import matplotlib.pyplot as plt

        fig = plt.figure(**figure_kwargs)
    else:
        from matplotlib.figure import Figure

        fig = Figure(**figure_kwargs)
    for i, tile in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(tile.picture)
        ax.set_title(f"{tile.title} @ {tile.layer}\n{tile.caption()}", fontsize=8)
        ax.axis("off")
    total = _count(items)
    if not tiles:
        fig.text(0.5, 0.5, "no maps", ha="center", va="center")
    elif total > len(tiles):
        fig.text(0.5, 0.01, f"{total - len(tiles)} more maps not shown (of {total})", ha="center", fontsize=9)
    fig.tight_layout()
    return fig


def show_tiles(items: Sequence[Explanation], *, limit: int = DISPLAY_LIMIT, columns: int = 4) -> None:
    """Draw the maps with pyplot and show them: a window in scripts, inline in Jupyter, nothing under Agg.

    Under a non-interactive backend (``Agg``, ``pdf``...: a server, a test run) the figure is made but not
    shown, with no warning; ``matplotlib.pyplot.gcf()`` returns it for saving.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    draw_tiles(items, limit=limit, columns=columns, pyplot=True)
    if matplotlib.get_backend().lower() not in _NON_INTERACTIVE:
        plt.show()


_NON_INTERACTIVE = frozenset({"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"})
