"""The bias terms of Keras layers, for FullGrad (:mod:`cnnlens.methods.fullgrad`) on a :class:`KerasModule`.

FullGrad needs, for every layer ``z = W x + b``, the gradient of the score with respect to ``z`` and the bias
``b``. Keras layers differ from torch modules in two ways that matter:

- **Weights are Keras variables** (torch parameters inside each layer's ``_torch_params``), read here through
  ``layer.bias.value`` / ``gamma`` / ``beta`` / ``moving_mean`` / ``moving_variance``.
- **The activation is fused.** ``Conv2D(..., activation="relu")`` returns ``relu(W x + b)``; hooks see only
  that output. The gradient with respect to ``z = W x + b`` is recovered exactly for the piecewise-linear
  activations: ``linear`` (the output gradient itself) and ``relu`` (the output gradient where the output is
  positive, the mask torch's own ReLU backward uses). Any other fused activation (``swish``, ``sigmoid``,
  ``relu6``...) is refused by :func:`keras_bias_layers`, naming the layer, rather than giving a wrong term.

Supported layers: ``Conv2D``, ``Conv2DTranspose``, ``DepthwiseConv2D`` and ``SeparableConv2D`` (the bias is
added after the convolution, per output channel), ``Dense`` (per unit, the last axis) and
``BatchNormalization`` on the channel axis (Keras runs it with its moving statistics under
``training=False``: the affine map ``gamma (x - mean) / sqrt(var + eps) + beta``, whose bias is
``beta - gamma mean / sqrt(var + eps)``). Any other layer that holds a bias or a ``beta`` (``Conv1D``,
``Conv3D``, ``LayerNormalization``, ``EinsumDense``...) is refused by name.

Example:
    >>> keras_bias_layers(wrap_keras(model))  # doctest: +SKIP
    ['block1_conv1', 'block1_conv2', ...]
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from cnnlens.errors import MethodError
from cnnlens.models.keras.module import KerasModule

__all__ = ["is_keras_layer", "keras_bias_layers", "keras_effective_bias", "pre_activation_gradient"]


def _keras() -> Any:
    return sys.modules["keras"]  # a KerasModule exists, so keras was imported (on the torch backend)


def is_keras_layer(obj: object) -> bool:
    """Whether ``obj`` is a Keras layer (False when Keras was never imported)."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.layers.Layer)


def _kinds() -> tuple[type, ...]:
    layers = _keras().layers
    return (layers.Conv2D, layers.Conv2DTranspose, layers.DepthwiseConv2D, layers.SeparableConv2D, layers.Dense)


def _activation_name(layer: Any) -> str:
    activation = getattr(layer, "activation", None)
    return str(getattr(activation, "__name__", activation))


def _channels_last(layer: Any) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _has_bias_variable(layer: Any) -> bool:
    """Whether a layer holds a bias-like variable of its own (``.../bias``, ``.../beta``)."""
    own = getattr(layer, "_trainable_variables", []) + getattr(layer, "_non_trainable_variables", [])
    return any(str(getattr(v, "name", "")) in ("bias", "beta") for v in own)


def keras_bias_layers(module: KerasModule) -> list[str]:
    """The paths of a Keras model's layers whose biases FullGrad uses, in layer order.

    Conv2D/Conv2DTranspose/DepthwiseConv2D/SeparableConv2D/Dense with ``use_bias`` and a ``linear`` or
    ``relu`` activation, and every BatchNormalization on the channel axis. A final softmax Dense is left out:
    the wrapper returns its pre-softmax logits itself, so the layer never runs (its bias term has no spatial
    extent and would not enter the map anyway).

    Raises:
        MethodError: a layer with a bias that FullGrad cannot use exactly (another fused activation, a
            BatchNormalization on another axis, an unsupported layer kind holding a bias or a ``beta``); the
            message names the layer and says what to do.
    """
    keras = _keras()
    supported = _kinds()
    names: list[str] = []
    refused: list[str] = []
    head = module._head  # the final softmax Dense: the wrapper computes its pre-softmax itself, it never runs
    for path, layer in module.keras_layer_paths:
        kind = type(layer).__name__
        if layer is head:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            axis = layer.axis
            channel_axis = -1 if module.cnnlens_layout == "nhwc" else 1
            if axis not in (channel_axis, 3 if channel_axis == -1 else 1):
                refused.append(f"{path} ({kind} on axis {axis}, not the channel axis)")
                continue
            names.append(path)
        elif isinstance(layer, supported):
            if not getattr(layer, "use_bias", False):
                continue
            activation = _activation_name(layer)
            if activation not in ("linear", "relu"):
                refused.append(f"{path} ({kind} with the fused activation {activation!r})")
                continue
            if (
                not isinstance(layer, keras.layers.Dense)
                and not _channels_last(layer)
                and module.cnnlens_layout == "nhwc"
            ):
                refused.append(f"{path} ({kind} with data_format='channels_first' in a channels-last model)")
                continue
            names.append(path)
        elif not isinstance(layer, keras.Model) and _has_bias_variable(layer):
            refused.append(f"{path} ({kind})")
    if refused:
        raise MethodError(
            "fullgrad cannot use the bias of these Keras layers exactly: "
            + "; ".join(refused[:8])
            + (f"; and {len(refused) - 8} more" if len(refused) > 8 else "")
            + ". FullGrad on Keras supports Conv2D, Conv2DTranspose, DepthwiseConv2D, SeparableConv2D and Dense with "
            "a 'linear' or 'relu' activation (the gradient before a fused activation is recovered only for those) "
            "and BatchNormalization on the channel axis. Use another method (gradcam, gradcampp, "
            "integrated_gradients...) on this model."
        )
    return names


def keras_effective_bias(layer: Any) -> torch.Tensor:
    """The bias ``b`` with ``layer(x) = act(W x + b)``, one value per output channel (a detached tensor).

    For a BatchNormalization: ``beta - gamma * moving_mean / sqrt(moving_variance + epsilon)`` (``gamma``
    1 without ``scale``, ``beta`` 0 without ``center``).

    Raises:
        MethodError: the layer has no bias.
    """
    keras = _keras()
    if isinstance(layer, keras.layers.BatchNormalization):
        mean = torch.as_tensor(layer.moving_mean.value).detach()
        scale = torch.rsqrt(torch.as_tensor(layer.moving_variance.value).detach() + layer.epsilon)
        gamma = torch.as_tensor(layer.gamma.value).detach() if layer.scale else torch.ones_like(scale)
        beta = torch.as_tensor(layer.beta.value).detach() if layer.center else torch.zeros_like(scale)
        return beta - gamma * mean * scale
    bias = getattr(layer, "bias", None)
    if bias is None:
        raise MethodError(f"fullgrad: the Keras layer {layer.name!r} ({type(layer).__name__}) has no bias.")
    return torch.as_tensor(bias.value).detach()


def pre_activation_gradient(layer: Any, output: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``d score / d z`` for ``z = W x + b`` from the layer's output and its gradient (fused activation undone).

    ``linear`` (and BatchNormalization): the gradient itself; ``relu``: the gradient where the output is positive
    (what ``torch.relu``'s backward computes).

    Raises:
        MethodError: another activation (:func:`keras_bias_layers` refuses those first).
    """
    if isinstance(layer, _keras().layers.BatchNormalization):
        return gradient
    activation = _activation_name(layer)
    if activation == "linear":
        return gradient
    if activation == "relu":
        return torch.where(output > 0, gradient, torch.zeros_like(gradient))
    raise MethodError(
        f"fullgrad: the Keras layer {layer.name!r} has the fused activation {activation!r}; only 'linear' and "
        "'relu' can be undone exactly."
    )
