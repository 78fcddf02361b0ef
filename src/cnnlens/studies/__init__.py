"""Studies: which target layer gives a faithful map, and how architectures compare at their best layers.

:func:`compare_layers` explains the same images at many candidate layers with several methods from a
single capture, then measures every map (Average Drop, Increase in Confidence, deletion and insertion AUC,
the share of degenerate maps) and recommends a layer by a documented rule. :func:`compare_models` runs each
model at its recommended (or given) layer on the same images and puts the numbers in one table.
"""

from cnnlens.studies.layers import (
    DEFAULT_STUDY_ROLES,
    LayerRow,
    LayerStudy,
    compare_layers,
    recommend,
    select_layers,
)
from cnnlens.studies.models import ModelRow, ModelStudy, compare_models

__all__ = [
    "DEFAULT_STUDY_ROLES",
    "LayerRow",
    "LayerStudy",
    "ModelRow",
    "ModelStudy",
    "compare_layers",
    "compare_models",
    "recommend",
    "select_layers",
]
