"""FullGrad (Srinivas & Fleuret, NeurIPS 2019): input gradients plus the bias gradients of every layer.

A network-scope method: it declares the modules it needs recorded (:func:`bias_modules`: every ``Conv2d``
and ``Linear`` with a bias and every ``BatchNorm2d`` that uses running statistics) and
:func:`cnnlens.explain.explain` records their outputs and gradients in one extra forward and backward, with
the targets fixed to the classes of the main capture. One :class:`~cnnlens.Explanation` per call, under the
layer key ``"network"``.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlens.errors import MethodError
from cnnlens.maps import precise_dtype
from cnnlens.methods.registry import LayerView, NetworkRecord, register

__all__ = ["bias_modules", "effective_bias", "fullgrad", "fullgrad_decomposition", "postprocess"]

_EPS = 1e-6
"""The reference code's guard in the min-max normalisation: ``x / (max x + 1e-6)`` after subtracting the min."""


def _keras_bias() -> ModuleType | None:
    """:mod:`cnnlens.models.keras.bias` when a Keras model exists in this process (never imports Keras itself)."""
    if "cnnlens.models.keras.module" not in sys.modules:
        return None
    from cnnlens.models.keras import bias

    return bias


def _is_keras_module(model: nn.Module) -> bool:
    keras_module = sys.modules.get("cnnlens.models.keras.module")
    return keras_module is not None and isinstance(model, keras_module.KerasModule)


def bias_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose bias FullGrad uses, in ``named_modules()`` order.

    ``Conv2d`` and ``Linear`` with a bias, and ``BatchNorm2d`` that tracks running statistics (in eval mode
    it is the affine map ``gamma (x - mu) / sqrt(var + eps) + beta``, whose bias is :func:`effective_bias`).
    On a Keras model (:class:`~cnnlens.models.keras.KerasModule`), the Keras layers of
    :func:`cnnlens.models.keras.bias.keras_bias_layers` (Conv2D/DepthwiseConv2D/SeparableConv2D/Dense with a
    ``linear`` or ``relu`` activation, BatchNormalization); a Keras layer it cannot use exactly is refused.

    Raises:
        MethodError: a Keras layer whose bias term FullGrad cannot compute exactly (named in the message).

    Example:
        >>> bias_modules(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False)))
        ['0', '1']
    """
    keras_bias = _keras_bias()
    if keras_bias is not None and _is_keras_module(model):
        found: list[str] = keras_bias.keras_bias_layers(model)
        return found
    names = []
    for name, module in model.named_modules():
        if (isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None) or (
            isinstance(module, nn.BatchNorm2d) and module.track_running_stats and module.running_mean is not None
        ):
            names.append(name)
    return names


def effective_bias(module: nn.Module) -> torch.Tensor:
    """The bias ``b`` with ``module(x) = W x + b``: the parameter, or ``beta - gamma mu / sqrt(var + eps)`` for BN.

    A Keras layer's bias is read from its Keras variables
    (:func:`cnnlens.models.keras.bias.keras_effective_bias`).

    Example:
        >>> bn = nn.BatchNorm2d(1).eval()
        >>> _ = bn.running_mean.fill_(2.0), bn.running_var.fill_(4.0 - 1e-5)
        >>> effective_bias(bn).tolist()
        [-1.0]
    """
    keras_bias = _keras_bias()
    if keras_bias is not None and keras_bias.is_keras_layer(module):
        bias: torch.Tensor = keras_bias.keras_effective_bias(module)
        return bias
    if isinstance(module, nn.BatchNorm2d):
        assert module.running_mean is not None  # bias_modules() keeps only BNs with running statistics
        assert module.running_var is not None
        scale = torch.rsqrt(module.running_var.detach() + module.eps)
        gamma = module.weight.detach() if module.weight is not None else torch.ones_like(scale)
        beta = module.bias.detach() if module.bias is not None else torch.zeros_like(scale)
        return beta - gamma * module.running_mean.detach() * scale
    own = getattr(module, "bias", None)
    if not isinstance(own, torch.Tensor):
        raise MethodError(f"fullgrad: {type(module).__name__} has no bias tensor; only modules with a bias are used.")
    return own.detach()


def _bias_map(
    module: Any, gradient: torch.Tensor, dtype: torch.dtype, output: torch.Tensor | None = None
) -> torch.Tensor:
    """``d f / d z ⊙ b`` with ``b`` broadcast along the module's channel dimension (1, or last for Linear).

    A Keras layer's output is recorded after its fused activation: its gradient is first taken back to the
    pre-activation ``z`` (:func:`cnnlens.models.keras.bias.pre_activation_gradient`), and its recorded maps
    are channels-first already (the capture reads them in the model's layout), so ``b`` runs along dim 1 of a
    4-D term and along the last dim of a 2-D one.
    """
    bias = effective_bias(module).to(device=gradient.device, dtype=dtype)
    keras_bias = _keras_bias()
    if keras_bias is not None and keras_bias.is_keras_layer(module):
        if output is None:
            raise MethodError(f"fullgrad: the Keras layer {module.name!r} needs its recorded output.")
        grad: torch.Tensor = keras_bias.pre_activation_gradient(module, output, gradient).to(dtype)
        return grad * bias if grad.ndim == 2 else grad * bias.view(1, -1, *([1] * (grad.ndim - 2)))
    if isinstance(module, nn.Linear):
        return gradient.to(dtype) * bias
    return gradient.to(dtype) * bias.view(1, -1, *([1] * (gradient.ndim - 2)))


def fullgrad_decomposition(view: LayerView) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full-gradient of one target: ``x ⊙ d f/d x`` and, per bias module, ``d f/d z ⊙ b``.

    For a piecewise-linear network in eval mode (ReLU, max/avg pooling, conv, linear, BN with running
    statistics) the terms add up to the score exactly: ``f(x) = sum(x ⊙ d f/d x) + sum_l sum(d f/d z_l ⊙ b_l)``
    (the paper's completeness, Eq. 2). Computed in float64 (float32 on MPS).

    Returns:
        ``(input_term (B, C, H, W), {module name: bias term, the module's output shape})``.
    """
    network: NetworkRecord = view.require_network("fullgrad")
    if view.input_gradient is None:
        raise MethodError("fullgrad needs the input gradient; call it through explain().")
    dtype = precise_dtype(view.input_gradient)
    input_term = view.input_gradient.to(dtype) * view.inputs.to(dtype)
    bias_terms = {
        name: _bias_map(network.modules[name], gradient, dtype, network.activations.get(name))
        for name, gradient in network.gradients.items()
    }
    return input_term, bias_terms


def _is_keras_layer(module: Any) -> bool:
    keras_bias = _keras_bias()
    return keras_bias is not None and bool(keras_bias.is_keras_layer(module))


def postprocess(term: torch.Tensor) -> torch.Tensor:
    """The reference code's ``psi``: absolute value, then a min-max normalisation per sample.

    ``x = |term|``, then ``(x - min) / (max(x - min) + 1e-6)`` over all of one sample's ``(C, h, w)``.

    Example:
        >>> postprocess(torch.tensor([[[[-2.0, 1.0], [0.0, 0.0]]]])).tolist()
        [[[[0.9999995231628418, 0.4999997615814209], [0.0, 0.0]]]]
    """
    x = term.abs()
    flat = x.flatten(1)
    x = x - flat.amin(dim=1).view(-1, *([1] * (x.ndim - 1)))
    return x / (x.flatten(1).amax(dim=1).view(-1, *([1] * (x.ndim - 1))) + _EPS)


@register(
    "fullgrad",
    title="FullGrad",
    needs={"probe"},
    scope="network",
    records=bias_modules,
    paper="Srinivas & Fleuret, Full-Gradient Representation for Neural Network Visualization, NeurIPS 2019 "
    "(arXiv:1905.00780)",
    formula="S = sum_c psi(x ⊙ dS/dx) + sum_l sum_c up(psi(dS/dz_l ⊙ b_l)) ;  psi = min-max(|.|) per sample",
    summary="Input gradient times input plus bias gradients of every conv/BN layer (one map for the network).",
)
def fullgrad(view: LayerView) -> torch.Tensor:
    """FullGrad saliency (Srinivas & Fleuret, NeurIPS 2019), as the authors' reference code computes it.

    Formula: ``S = sum_c psi(x ⊙ ∇_x f) + sum_l sum_c up(psi(∇_{z_l} f ⊙ b_l))`` over every bias module ``l``
    whose output is a feature map ``(B, C, h, w)`` (:func:`bias_modules`; a BN's bias is its eval-mode
    :func:`effective_bias`). ``psi`` is :func:`postprocess`: absolute value, then a min-max normalisation
    per sample over the whole ``(C, h, w)`` term (``(x - min) / (max(x - min) + 1e-6)``); ``up`` is a
    bilinear upsampling to the input size with ``align_corners=True``; the channel sum comes after both (this
    is the order of ``FullGrad.saliency`` in github.com/idiap/fullgrad-saliency; the normalisation is affine,
    so normalising before or after the convex bilinear interpolation differs only where the interpolation
    does not reach a term's extremes). Bias terms of modules after global pooling (a classifier's
    ``Linear``) have no spatial extent: they enter the completeness decomposition
    (:func:`fullgrad_decomposition`), not the map. The raw map is non-negative; the display ReLU is a no-op.

    Differences from pytorch-grad-cam's ``FullGrad``: it min-max normalises every channel separately (with
    1e-7) instead of the whole term, resizes with OpenCV (half-pixel centres) before summing, takes only
    modules whose type is exactly ``Conv2d``/``BatchNorm2d``, and normalises the final sum itself. On a
    network whose terms have one channel at input resolution the two agree up to the epsilons
    (``tests/test_fullgrad.py``).

    Cost: one extra forward and backward per call that records every bias module.

    Example:
        >>> import cnnlens
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 2))
        >>> r = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["fullgrad"])
        >>> r["fullgrad", None].layer, r["fullgrad", None].raw.shape
        ('network', torch.Size([1, 1, 8, 8]))
    """
    input_term, bias_terms = fullgrad_decomposition(view)
    size = (int(input_term.shape[-2]), int(input_term.shape[-1]))
    network = view.require_network("fullgrad")
    saliency = postprocess(input_term).sum(dim=1)
    for name, term in bias_terms.items():
        if term.ndim != 4:
            continue  # after global pooling: no spatial map
        if isinstance(network.modules[name], nn.Linear) and not _is_keras_layer(network.modules[name]):
            term = term.permute(0, 3, 1, 2)  # a Linear on a (B, h, w, C) feature map
        scaled = F.interpolate(postprocess(term), size=size, mode="bilinear", align_corners=True)
        saliency = saliency + scaled.sum(dim=1)
    return saliency
