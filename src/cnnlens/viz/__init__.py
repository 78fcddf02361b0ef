"""Figures for people: labelled grids with colour bars, and the forward views' renderers.

:mod:`cnnlens.viz.grids` has the generic helpers; :mod:`cnnlens.viz.views` draws filter grids, feature-map
grids and maximised images.

matplotlib is used through its object API with an Agg canvas; no pyplot state.
"""

from cnnlens.viz.grids import GridRow, image_grid, mosaic, new_figure, rows_figure, safe_name, save_figure

__all__ = ["GridRow", "image_grid", "mosaic", "new_figure", "rows_figure", "safe_name", "save_figure"]
