"""Targets: what score a backward view explains.

A target is a callable from the model output to one score per sample ``(B,)``; for classifiers the output is
logits ``(B, K)``. Users pass an int or a class name (one class for every sample), a sequence of ints and/or
class names (one class per sample), ``None`` (the top class), a ``(B, T)`` index tensor (T classes per sample)
or their own callable; :func:`resolve_targets` converts these at the edge. Class names match the model's names
case-insensitively (:func:`class_index`). Scores are logits by default: a softmax saturates, and its gradient
vanishes for confident predictions.

Two modules: :mod:`cnnlens.targets.base` (the :class:`Target` protocol, class, rank and function targets,
resolution) and :mod:`cnnlens.targets.raw` (targets on raw outputs: segmentation, dense regions, multi-label
heads, contrasts). A target may also have ``expand(logits)`` (it stands for several targets known only after the
forward), ``freeze(logits)`` (what it picks on the output is fixed on the clean output) and
``select(sample_index)`` (its layout for rows of the batch); see :mod:`cnnlens.targets.raw`.
"""

from __future__ import annotations

from cnnlens.targets.base import (
    ClassTarget,
    FunctionTarget,
    RankTarget,
    Score,
    Target,
    TargetSpec,
    class_index,
    name_targets,
    resolve_targets,
)
from cnnlens.targets.raw import (
    ContrastiveTarget,
    LabelTarget,
    MultiLabelTarget,
    RegionTarget,
    SegmentationTarget,
    expand_targets,
)

__all__ = [
    "ClassTarget",
    "ContrastiveTarget",
    "FunctionTarget",
    "LabelTarget",
    "MultiLabelTarget",
    "RankTarget",
    "RegionTarget",
    "Score",
    "SegmentationTarget",
    "Target",
    "TargetSpec",
    "class_index",
    "expand_targets",
    "name_targets",
    "resolve_targets",
]
