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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from cnnlens.capture import DifferentiableCapture, differentiable_capture, resolve_layer
from cnnlens.errors import InputShapeError, LayerError, OptionError, TargetError
from cnnlens.models import LoadedModel
from cnnlens.outputs import OutputSelector
from cnnlens.views._common import (
    Normalization,
    intra_op_threads,
    model_device,
    normalization_of,
    parse_channels,
    unwrap,
)
from cnnlens.views.objectives import Objective, ObjectiveInputs, channel, class_logit, neuron
from cnnlens.views.parameterization import ParameterizationFactory, fourier
from cnnlens.views.transforms import BatchRandom, Transform, standard_transforms

__all__ = [
    "MaximizeResult",
    "Progress",
    "TransformSpec",
    "image_seed",
    "maximize",
    "maximize_classes",
    "optimize",
]

Progress = Callable[[int, int], None]
"""``progress(steps_done, steps_total)``, called after every optimisation step."""

TransformSpec = Transform | Literal["standard"] | None
"""A transform, ``"standard"`` (:func:`~cnnlens.views.transforms.standard_transforms` for the size) or None."""

_MASK64 = (1 << 64) - 1


def image_seed(seed: int, key: int) -> int:
    """The seed of the image for ``key`` (a channel or class) in a run with ``seed``.

    ``splitmix64(splitmix64(seed) xor key)`` truncated to 63 bits: distinct keys and seeds give unrelated
    streams, and the result does not depend on anything else (batch position, other keys).

    Example:
        >>> image_seed(0, 3) == image_seed(0, 3) != image_seed(1, 3)
        True
    """

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    return mix(mix(int(seed) & _MASK64) ^ (int(key) & _MASK64)) >> 1


@dataclass(frozen=True)
class MaximizeResult:
    """Optimised images and how they score.

    Attributes:
        images: ``(N, 3, H, W)`` float32 in ``[0, 1]`` on the CPU (untransformed).
        keys: The channel (or class) of each image.
        labels: One label per image (e.g. ``"channel 7"``).
        objective: The objective's description (for the whole batch).
        layer: The layer of a channel/neuron objective (None for classes).
        scores: ``(N,)`` each image's objective on its final, untransformed image.
        history: ``(steps, N)`` each image's objective at every step (on the transformed image).
        seconds: Wall-clock time of the optimisation.
        settings: Steps, learning rate, seed, size, parameterisation and transforms, for manifests.
    """

    images: torch.Tensor
    keys: list[int]
    labels: list[str]
    objective: str
    layer: str | None
    scores: torch.Tensor
    history: torch.Tensor
    seconds: float
    settings: dict[str, object] = field(default_factory=dict)

    def uint8(self, index: int) -> torch.Tensor:
        """Image ``index`` as ``(H, W, 3)`` uint8."""
        return (self.images[index].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 16 or w < 16:
        raise InputShapeError(f"the optimised images must be at least 16x16 pixels; got {h}x{w}.")
    return h, w


def _check_schedule(steps: int, lr: float) -> None:
    if not isinstance(steps, int) or steps < 0:
        raise OptionError(f"steps must be a non-negative integer; got {steps!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise OptionError(f"the learning rate must be a positive finite number; got {lr!r}.")


def _transform(spec: TransformSpec, size: tuple[int, int]) -> Transform | None:
    if isinstance(spec, str):
        if spec != "standard":
            raise OptionError(f"transforms must be a transform, 'standard' or None; got {spec!r}.")
        return standard_transforms(min(size))
    return spec


def optimize(
    model: nn.Module | LoadedModel,
    objective: Objective,
    keys: Sequence[int],
    *,
    size: int | tuple[int, int] = 128,
    steps: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    param: ParameterizationFactory | None = None,
    transforms: TransformSpec = "standard",
    normalization: Normalization | None = None,
    progress: Progress | None = None,
    output_selector: OutputSelector | None = None,
    labels: Sequence[str] | None = None,
    layer: str | None = None,
    threads: int | None = None,
) -> MaximizeResult:
    """Optimise one batch of images, image ``b`` seeded by ``image_seed(seed, keys[b])``, to maximise ``objective``.

    The objective returns one score per image; the loss is ``-sum_b S_b`` and its gradient is taken with
    ``torch.autograd.grad`` with respect to the parameterisation only (see the module docstring).

    Args:
        model: The network (or a :class:`~cnnlens.models.LoadedModel`, which brings its normalisation).
        objective: What to maximise, per image (e.g. ``channel("blocks.3", [0, 1]) - 0.05 * l2()``).
        keys: One key per image (usually its channel or class): the image's randomness depends on
            ``(seed, key)`` only.
        size: Image size, ``H = W`` or ``(H, W)``.
        steps: Adam steps.
        lr: Adam learning rate.
        seed: The run's seed.
        param: Parameterisation factory (default :class:`~cnnlens.views.parameterization.fourier`).
        transforms: A transform, ``"standard"`` (default) or None (no robustness transforms).
        normalization: ``(mean, std)`` of the model input (default: the zoo model's, else ImageNet's).
        progress: Called as ``progress(step, steps)`` after every step.
        output_selector: Picks the logits from unusual model outputs.
        labels: One label per image (default: ``"key k"``).
        layer: Recorded in the result for labelling.
        threads: ``torch.set_num_threads`` for the loop, restored afterwards (None: leave torch's setting).
            On a CPU shared with other jobs one thread can be several times faster: each step is hundreds
            of small ops, and every OpenMP barrier waits for preempted threads.

    Returns:
        The :class:`MaximizeResult`.

    Raises:
        LayerNotFoundError: The objective reads an unknown layer.
        LayerError, TargetError: The objective does not fit the layer or the model output.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> res = optimize(net, channel("1", [0, 2]), [0, 2], size=32, steps=5)
        >>> res.images.shape, bool((res.history[-1] >= res.history[0]).all())
        (torch.Size([2, 3, 32, 32]), True)
    """
    module = unwrap(model)
    hw = _size(size)
    _check_schedule(steps, lr)
    key_list = [int(k) for k in keys]
    if not key_list:
        raise TargetError("give at least one image key (a channel or class index).")
    if not isinstance(objective, Objective):
        raise TargetError(
            f"objective must be an Objective (see cnnlens.views.objectives); got {type(objective).__name__}."
        )
    if labels is not None and len(labels) != len(key_list):
        raise TargetError(f"got {len(labels)} labels for {len(key_list)} images.")
    for name in objective.layers:
        resolve_layer(module, name)  # unknown names fail here, with suggestions
    transform = _transform(transforms, hw)
    factory = param if param is not None else fourier()
    device = model_device(module)
    mean, std = normalization_of(model, normalization)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    generators = [torch.Generator().manual_seed(image_seed(seed, k)) for k in key_list]
    image = factory(generators, hw, device)
    rng = BatchRandom(generators)
    optimizer = torch.optim.Adam(image.parameters, lr=lr)
    batch = len(key_list)
    history = torch.zeros(steps, batch)
    layers = sorted(objective.layers)
    started = time.perf_counter()

    def scores_of(images: torch.Tensor, view: torch.Tensor, cap: DifferentiableCapture) -> torch.Tensor:
        rec = cap.run_graph((view - mean_t) / std_t)
        values = objective(ObjectiveInputs(rec.activations, rec.logits, images))
        if values.shape != (batch,):
            raise TargetError(
                f"objective {objective.name!r} returned shape {tuple(values.shape)}; it must give one score per "
                f"image, ({batch},)."
            )
        return values

    with (
        intra_op_threads(threads),
        differentiable_capture(
            module, layers, output_selector=output_selector, stop_early=not objective.needs_logits
        ) as cap,
    ):
        for step in range(steps):
            images = image()
            view = transform(images, rng) if transform is not None else images
            values = scores_of(images, view, cap)
            grads = torch.autograd.grad(-values.sum(), image.parameters, allow_unused=True)
            for leaf, grad in zip(image.parameters, grads, strict=True):
                leaf.grad = torch.zeros_like(leaf) if grad is None else torch.nan_to_num(grad, 0.0, 0.0, 0.0)
            optimizer.step()
            history[step] = torch.nan_to_num(values.detach().float().cpu(), 0.0, 0.0, 0.0)
            if progress is not None:
                progress(step + 1, steps)
        for leaf in image.parameters:
            leaf.grad = None
        final_images = image().detach()
        final = scores_of(final_images, final_images, cap).detach().float().cpu()
    seconds = time.perf_counter() - started
    return MaximizeResult(
        images=torch.nan_to_num(final_images.float().cpu(), 0.5, 1.0, 0.0).clamp(0, 1),
        keys=key_list,
        labels=list(labels) if labels is not None else [f"key {k}" for k in key_list],
        objective=objective.name,
        layer=layer,
        scores=torch.nan_to_num(final, 0.0, 0.0, 0.0),
        history=history,
        seconds=seconds,
        settings={
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "size": list(hw),
            "param": repr(factory),
            "transforms": repr(transform),
            "normalization": {"mean": list(mean), "std": list(std)},
            "threads": threads if threads is not None else torch.get_num_threads(),
        },
    )


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
    """Channels of a layer's output when known from the module alone (None: checked at run time)."""
    for attr in ("out_channels", "num_features", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None
