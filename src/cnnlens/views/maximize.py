"""Activation maximisation: images optimised to excite channels, neurons or classes.

Feature visualisation by optimisation (Erhan et al. 2009; Simonyan et al. 2014; Olah, Mordvintsev &
Schubert, "Feature Visualization", Distill 2017): starting from a random image ``I_0``, gradient ascent on

``theta* = argmax_theta  S(model(normalise(T(I(theta)))))``

where ``I(theta)`` is an image parameterisation (:mod:`cnnlens.views.parameterization`, a ``1/f``-scaled
Fourier spectrum with decorrelated colour by default), ``T`` a random robustness transform drawn anew at
every step (:mod:`cnnlens.views.transforms`), ``normalise`` the model's own input normalisation and ``S``
an objective (:mod:`cnnlens.views.objectives`: a channel's mean activation, a neuron, a class logit,
penalties, and their sums and weights). The optimiser is Adam on ``theta``.

Many images are optimised as **one batch**, one image per channel: the objective of image ``b`` reads
channel ``c_b`` of image ``b`` only, the model is in eval mode (no batch statistics), and Adam updates each
element on its own gradient, so every image follows the path it would follow alone. The randomness of image
``b`` (its initial spectrum and every transform it undergoes) comes from its own generator seeded with
``image_seed(seed, c_b)``, so a channel's result depends on ``(seed, channel)`` only, not on its batch
position or on the other channels: the batched run equals the one-channel runs up to float rounding.

Activations come from :func:`cnnlens.capture.differentiable_capture` (the only place hooks touch the
model): eval mode for the call, every ``requires_grad`` and ``training`` flag restored afterwards, hooks
removed in ``finally``, and gradients taken with ``torch.autograd.grad`` with respect to ``theta`` only, so
parameter ``.grad`` is never touched. When the objective reads no logits, each forward stops after the last
layer it needs.

Keras models (:class:`cnnlens.models.keras.KerasModule`) run the same way: their channels-last layer outputs
reach the objectives in the ``(B, C, h, w)`` map view (the capture's layout), the image is reversed to BGR
for a 'caffe' model, and a model built for one input size gets each transformed image resized (bilinear,
differentiable) to that size, since Keras refuses any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from cnnlens.capture import resolve_layer
from cnnlens.errors import LayerError, OptionError
from cnnlens.models import LoadedModel
from cnnlens.views._common import (
    Normalization,
    parse_channels,
    unwrap,
)
from cnnlens.views.objectives import Objective, channel, class_logit, neuron
from cnnlens.views.optimize import (
    MaximizeResult,
    Progress,
    TransformSpec,
    image_seed,
    optimize,
)
from cnnlens.views.parameterization import ParameterizationFactory

__all__ = [
    "MaximizeResult",
    "Progress",
    "TransformSpec",
    "image_seed",
    "maximize",
    "maximize_classes",
    "optimize",
]


def _merge(parts: Sequence[MaximizeResult], objective: str, layer: str | None, seconds: float) -> MaximizeResult:
    first = parts[0]
    return MaximizeResult(
        images=torch.cat([p.images for p in parts]),
        keys=[k for p in parts for k in p.keys],
        labels=[label for p in parts for label in p.labels],
        objective=objective,
        layer=layer,
        scores=torch.cat([p.scores for p in parts]),
        history=torch.cat([p.history for p in parts], dim=1),
        seconds=seconds,
        settings=first.settings,
    )


def _chunked(
    model: nn.Module | LoadedModel,
    keys: list[int],
    make: Callable[[list[int]], Objective],
    describe: str,
    layer: str | None,
    label: Callable[[int], str],
    max_batch: int | None,
    progress: Progress | None,
    options: dict[str, Any],
) -> MaximizeResult:
    if max_batch is not None and max_batch < 1:
        raise OptionError(f"max_batch must be at least 1 (or None for one batch); got {max_batch}.")
    chunk = len(keys) if max_batch is None else max_batch
    chunks = [keys[i : i + chunk] for i in range(0, len(keys), chunk)]
    steps = int(options["steps"])
    total = steps * len(chunks)
    parts = []
    started = time.perf_counter()
    for n, part in enumerate(chunks):
        offset = n * steps

        def report(step: int, _steps: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + step, total)

        objective = make(part)
        labels = [label(k) for k in part]
        parts.append(optimize(model, objective, part, labels=labels, layer=layer, progress=report, **options))
    return _merge(parts, describe, layer, time.perf_counter() - started)


def maximize(
    model: nn.Module | LoadedModel,
    layer: str,
    channels: str | int | Sequence[int],
    *,
    objective: Literal["channel", "neuron"] = "channel",
    extra: Objective | None = None,
    size: int | tuple[int, int] = 128,
    steps: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    param: ParameterizationFactory | None = None,
    transforms: TransformSpec = "standard",
    normalization: Normalization | None = None,
    max_batch: int | None = 32,
    progress: Progress | None = None,
    threads: int | None = None,
) -> MaximizeResult:
    """Optimise one image per channel of ``layer`` to excite that channel (all in one batch).

    Objective of image ``b``: the mean activation of channel ``c_b``,
    ``S_b = (1 / hw) sum_ij A[b, c_b, i, j]`` (``objective="channel"``), or its centre neuron
    ``A[b, c_b, h/2, w/2]`` (``"neuron"``), plus ``extra`` (e.g. ``-0.05 * total_variation()``). See the
    module docstring for the parameterisation, the transforms and why batching does not change results.

    Args:
        model: The network (or a :class:`~cnnlens.models.LoadedModel`).
        layer: The layer's dotted name.
        channels: The channels (``"0-15"``, an int or a list); one image each.
        objective: ``"channel"`` or ``"neuron"``.
        extra: An objective added to every image's score (penalties with negative weights).
        size: Image size.
        steps: Adam steps.
        lr: Adam learning rate.
        seed: The run's seed; channel ``c``'s image depends on ``(seed, c)`` only.
        param: Parameterisation factory (default Fourier with decorrelated colour).
        transforms: A transform, ``"standard"`` or None.
        normalization: ``(mean, std)`` of the model input (default: the zoo model's, else ImageNet's).
        max_batch: At most this many images per batch (None: all in one).
        progress: Called as ``progress(done, total)`` after every step.
        threads: Intra-op threads for the optimisation, restored afterwards (see :func:`optimize`).

    Returns:
        The :class:`MaximizeResult`, one image per channel in the order given.

    Raises:
        LayerNotFoundError: Unknown layer.
        LayerError: A channel out of range, or a layer without channels.

    Example:
        >>> from cnnlens.models import load_model
        >>> lm = load_model("efficientnet_lite0")  # doctest: +SKIP
        >>> res = maximize(lm, "blocks.3", "0-15", steps=64)  # doctest: +SKIP
        >>> res.images.shape  # doctest: +SKIP
        torch.Size([16, 3, 128, 128])
    """
    module = unwrap(model)
    ref = resolve_layer(module, layer)
    if objective not in ("channel", "neuron"):
        raise LayerError(f"objective must be 'channel' or 'neuron'; got {objective!r}.")
    keys = parse_channels(channels, _channel_count(ref.module))
    build = channel if objective == "channel" else neuron

    def make(part: list[int]) -> Objective:
        base: Objective = build(ref.key, part)
        return base + extra if extra is not None else base

    describe = f"{objective} {ref.key}:{parse_channels(channels)}" + (f" + {extra.name}" if extra is not None else "")
    return _chunked(
        model,
        keys,
        make,
        describe,
        ref.key,
        lambda k: f"{objective} {k}",
        max_batch,
        progress,
        {
            "size": size,
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "param": param,
            "transforms": transforms,
            "normalization": normalization,
            "threads": threads,
        },
    )


def maximize_classes(
    model: nn.Module | LoadedModel,
    classes: str | int | Sequence[int],
    *,
    extra: Objective | None = None,
    size: int | tuple[int, int] = 128,
    steps: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    param: ParameterizationFactory | None = None,
    transforms: TransformSpec = "standard",
    normalization: Normalization | None = None,
    max_batch: int | None = 32,
    progress: Progress | None = None,
    threads: int | None = None,
) -> MaximizeResult:
    """Optimise one image per class to maximise its logit ``S_b = z[b, k_b]`` (all in one batch).

    Same arguments as :func:`maximize`; labels use the zoo model's class names when known.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> maximize_classes(net, [0, 2], size=32, steps=3).keys
        [0, 2]
    """
    keys = parse_channels(classes)
    names = model.class_names if isinstance(model, LoadedModel) else None

    def make(part: list[int]) -> Objective:
        base: Objective = class_logit(part)
        return base + extra if extra is not None else base

    def label(k: int) -> str:
        return f"class {k} {names[k]}" if names is not None and 0 <= k < len(names) else f"class {k}"

    describe = f"logit {keys}" + (f" + {extra.name}" if extra is not None else "")
    return _chunked(
        model,
        keys,
        make,
        describe,
        None,
        label,
        max_batch,
        progress,
        {
            "size": size,
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "param": param,
            "transforms": transforms,
            "normalization": normalization,
            "threads": threads,
        },
    )


def _channel_count(module: nn.Module) -> int | None:
    """Channels of a layer's output when known from the module alone (None: checked at run time).

    Torch modules say ``out_channels``/``num_features``/``out_features``; Keras layers ``filters``/``units``.
    """
    for attr in ("out_channels", "num_features", "out_features", "filters", "units"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None
