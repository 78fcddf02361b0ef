"""The model comparison: each architecture at its recommended (or given) layer, on the same images.

``compare_models`` is over ~80 lines only because of its docstring; its code is ~60 lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cnnlens.capture.layout import LayoutSpec
from cnnlens.errors import ModelConfigError
from cnnlens.execution import Execution
from cnnlens.models import LoadedModel
from cnnlens.studies.layers import DEFAULT_STUDY_ROLES, LayerStudy, compare_layers

__all__ = ["ModelRow", "ModelStudy", "compare_models"]


@dataclass
class ModelRow:
    """One (model, method) at the layer it was compared at.

    Attributes:
        model: Model name.
        family: Architecture family (``vgg``, ``resnet``, ``inception``...).
        random_weights: True when the model is untrained (clearly marked in every output).
        method: Method id.
        layer: The layer used.
        how: ``"recommended"`` (by the layer study's rule) or ``"given"``.
        average_drop: Average Drop % (lower is better).
        increase: % Increase in Confidence.
        deletion_auc: Mean deletion AUC (lower is better).
        insertion_auc: Mean insertion AUC (higher is better).
        degenerate: Share of degenerate maps.
        top1: The top-1 class name of each image.
    """

    model: str
    family: str
    random_weights: bool
    method: str
    layer: str
    how: str
    average_drop: float
    increase: float
    deletion_auc: float
    insertion_auc: float
    degenerate: float
    top1: list[str] = field(default_factory=list)


@dataclass
class ModelStudy:
    """The result of :func:`compare_models`: one row per (model, method) and each model's layer study."""

    rows: list[ModelRow]
    layer_studies: dict[str, LayerStudy]
    image_names: list[str]

    def table(self) -> list[dict[str, Any]]:
        """Rows as dictionaries."""
        return [dict(r.__dict__) for r in self.rows]


def compare_models(
    models: Sequence[LoadedModel],
    images: Sequence[np.ndarray],
    *,
    methods: Sequence[str] = ("gradcam", "gradcampp"),
    layers: Mapping[str, str] | None = None,
    image_names: Sequence[str] | None = None,
    steps: int = 16,
    last_n: int | None = 3,
    progress: Callable[[int, int], None] | None = None,
    execution: Execution | None = None,
    layouts: Mapping[str, LayoutSpec | Mapping[str, LayoutSpec]] | None = None,
) -> ModelStudy:
    """Compare architectures on the same images, each at its best layer.

    Each model preprocesses the same RGB images its own way (size, crop, mean/std). Without a given layer a
    model is studied over its candidate layers (:func:`cnnlens.studies.compare_layers`, roles
    :data:`~cnnlens.studies.layers.DEFAULT_STUDY_ROLES`) and compared at the layer recommended for each method.

    Args:
        models: Loaded models (random-weight models are allowed and marked).
        images: ``uint8 (H, W, 3)`` RGB images.
        methods: Method ids.
        layers: Model name -> layer to use instead of the recommendation.
        image_names: Names for reports.
        steps: Deletion/insertion steps.
        last_n: How many of the last merges/block outputs each layer study keeps.
        progress: Passed to each model's :func:`~cnnlens.studies.compare_layers` (maps measured, per model).
        execution: How to run (:class:`cnnlens.Execution`), passed to each layer study.
        layouts: Model name -> how its layers' outputs map to ``(C, h, w)`` maps (``layout=`` of
            :func:`cnnlens.explain`: one layout text for all its layers, or ``{layer: text}``); a model not named
            has its layouts inferred (ViT tokens, channels-last outputs), as do all models by default.

    Returns:
        A :class:`ModelStudy`.
    """
    if not models:
        raise ModelConfigError("compare_models needs at least one model.")
    if not images:
        raise ModelConfigError("compare_models needs at least one image.")
    names = list(image_names) if image_names is not None else [f"image{i}" for i in range(len(images))]
    rows: list[ModelRow] = []
    studies: dict[str, LayerStudy] = {}
    given = dict(layers or {})
    given_layouts = dict(layouts or {})
    unknown = sorted(set(given_layouts) - {m.spec.name for m in models})
    if unknown:
        raise ModelConfigError(
            f"layouts were given for {unknown}, which are not among the compared models "
            f"({', '.join(m.spec.name for m in models)}); key them by model name."
        )
    for model in models:
        prep = model.spec.preprocessing
        x = torch.stack([prep.to_tensor(img) for img in images])
        layer = given.get(model.spec.name)
        study = compare_layers(
            model,
            x,
            methods=methods,
            layers=[layer] if layer else None,
            roles=DEFAULT_STUDY_ROLES,
            last_n=last_n,
            steps=steps,
            image_names=names,
            progress=progress,
            execution=execution,
            layout=given_layouts.get(model.spec.name),
        )
        studies[model.spec.name] = study
        top = study.explanations.top_k(1)
        top1 = [row[0][1] for row in top]
        for method in methods:
            chosen = layer or study.recommended.get(method)
            if chosen is None:
                continue
            r = study.row(method, chosen)
            rows.append(
                ModelRow(
                    model=model.spec.name,
                    family=model.spec.family,
                    random_weights=model.random_weights,
                    method=method,
                    layer=chosen,
                    how="given" if layer else "recommended",
                    average_drop=r.average_drop,
                    increase=r.increase,
                    deletion_auc=r.deletion_auc,
                    insertion_auc=r.insertion_auc,
                    degenerate=r.degenerate,
                    top1=top1,
                )
            )
    return ModelStudy(rows=rows, layer_studies=studies, image_names=names)
