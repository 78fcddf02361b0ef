"""Forward views: filter weights, feature maps and activation maximisation.

* :func:`filters`: a conv's kernels as tiles (RGB for the first conv; mean over inputs, input slices or a
  weight matrix deeper), sorted by index or L2 norm, with explicit colour limits.
* :func:`feature_maps`: the channels of one or several layers for one image (one forward through
  :func:`cnnlens.capture.record`), ranked by mean activation or Grad-CAM weight.
* :func:`maximize` / :func:`maximize_classes` / :func:`optimize`: images optimised to excite channels,
  neurons or classes (Olah et al., "Feature Visualization", Distill 2017), many channels in one batch; the
  objectives (:mod:`cnnlens.views.objectives`), parameterisations (:mod:`cnnlens.views.parameterization`)
  and transforms (:mod:`cnnlens.views.transforms`) are small composable pieces.

The functions here return tensors and metadata; :mod:`cnnlens.viz.views` draws them, and
:func:`cnnlens.report.demo.demo_section` writes the demo report's "filters and feature maps" section.

Example:
    >>> from cnnlens.models import load_model
    >>> from cnnlens.views import filters, feature_maps, maximize
    >>> lm = load_model("efficientnet_lite0")  # doctest: +SKIP
    >>> fs = filters(lm)  # doctest: +SKIP
    >>> res = maximize(lm, "blocks.3", "0-7", steps=64)  # doctest: +SKIP
"""

from cnnlens.views._common import parse_channels
from cnnlens.views.features import FeatureMaps, LayerFeatures, feature_maps
from cnnlens.views.filters import FilterSet, filters, first_conv
from cnnlens.views.maximize import MaximizeResult, image_seed, maximize, maximize_classes, optimize
from cnnlens.views.objectives import Objective, channel, class_logit, l2, neuron, total_variation
from cnnlens.views.parameterization import fourier, pixels
from cnnlens.views.transforms import BatchRandom, compose, jitter, pad, random_rotate, random_scale, standard_transforms

__all__ = [
    "BatchRandom",
    "FeatureMaps",
    "FilterSet",
    "LayerFeatures",
    "MaximizeResult",
    "Objective",
    "channel",
    "class_logit",
    "compose",
    "feature_maps",
    "filters",
    "first_conv",
    "fourier",
    "image_seed",
    "jitter",
    "l2",
    "maximize",
    "maximize_classes",
    "neuron",
    "optimize",
    "pad",
    "parse_channels",
    "pixels",
    "random_rotate",
    "random_scale",
    "standard_transforms",
    "total_variation",
]
