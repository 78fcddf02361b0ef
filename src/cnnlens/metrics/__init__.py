"""cnnlens.metrics: how faithful, well-placed and sane a saliency map is, measured.

Faithfulness (does the model need what the map highlights?):

* :func:`average_drop` — Average Drop % and % Increase in Confidence (Grad-CAM++), per image and overall;
  :func:`win_percent` compares two methods on the same images.
* :func:`deletion`, :func:`insertion`, :func:`deletion_insertion` — RISE's causal games and their AUC.
* :func:`road` — ROAD MoRF/LeRF with noisy linear imputation (:func:`noisy_linear_imputation`).

Localisation (does the map point at the object?): :func:`pointing_game`, :func:`energy_in_box`.

Sanity (does the map depend on the model?): :func:`cascading_randomisation` with :func:`spearman` and
:func:`ssim`.

Every metric takes the model (an ``nn.Module`` or a :class:`~cnnlens.models.LoadedModel`), the preprocessed
inputs ``(B, C, H, W)`` and the maps ``(B, H, W)`` or an :class:`~cnnlens.explanation.Explanation`, and
returns a small dataclass with per-image tensors and summary floats. The metrics that run the model share one
:class:`MetricOptions` (score, input normalisation, target index, output selector, and the
:class:`cnnlens.Execution` that says how to run); each keeps only its own protocol parameters as keywords.
Forwards run in memory-bounded batches (:mod:`cnnlens.batching`) inside a layer-less capture (eval mode, no
graph, the model's state restored); nothing is remembered between calls. No result is ever NaN: undefined
cases are flagged instead.

Example:
    >>> import cnnlens
    >>> from cnnlens import metrics
    >>> model = cnnlens.load_model("efficientnet_lite0")  # doctest: +SKIP
    >>> exp = cnnlens.explain(model, x, methods=["gradcam"])[0]  # doctest: +SKIP
    >>> metrics.average_drop(model, x, exp).average_drop  # doctest: +SKIP
    >>> deletion, insertion = metrics.deletion_insertion(model, x, exp)  # doctest: +SKIP
    >>> opts = metrics.MetricOptions(execution=cnnlens.Execution(memory_format="channels_last"))
    >>> metrics.deletion(model, x, exp, options=opts).mean_auc  # doctest: +SKIP
"""

from cnnlens.metrics._common import MeanStd, MetricError, Normalization, Space
from cnnlens.metrics._forward import ScoreKind
from cnnlens.metrics.causal import (
    Baseline,
    CausalCurve,
    auc,
    blur,
    deletion,
    deletion_insertion,
    insertion,
    rise_blur_kernel,
    saliency_order,
)
from cnnlens.metrics.confidence import AverageDropResult, WinResult, average_drop, explanation_images, win_percent
from cnnlens.metrics.localisation import EnergyResult, PointingResult, boxes_to_masks, energy_in_box, pointing_game
from cnnlens.metrics.options import MetricOptions
from cnnlens.metrics.randomisation import (
    RandomisationResult,
    cascade_layers,
    cascading_randomisation,
    randomise_module,
)
from cnnlens.metrics.road import RoadResult, noisy_linear_imputation, removal_count, road
from cnnlens.metrics.similarity import Correlation, rankdata, spearman, ssim

__all__ = [
    "AverageDropResult",
    "Baseline",
    "CausalCurve",
    "Correlation",
    "EnergyResult",
    "MeanStd",
    "MetricError",
    "MetricOptions",
    "Normalization",
    "PointingResult",
    "RandomisationResult",
    "RoadResult",
    "ScoreKind",
    "Space",
    "WinResult",
    "auc",
    "average_drop",
    "blur",
    "boxes_to_masks",
    "cascade_layers",
    "cascading_randomisation",
    "deletion",
    "deletion_insertion",
    "energy_in_box",
    "explanation_images",
    "insertion",
    "noisy_linear_imputation",
    "pointing_game",
    "randomise_module",
    "rankdata",
    "removal_count",
    "rise_blur_kernel",
    "road",
    "saliency_order",
    "spearman",
    "ssim",
    "win_percent",
]
