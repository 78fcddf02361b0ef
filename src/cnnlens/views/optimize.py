"""The optimisation loop of activation maximisation: one batch of images, each exciting its own objective.

:func:`optimize` is the loop (parameterisation, transforms, Adam, per-image seeds); :mod:`cnnlens.views.maximize`
builds the objectives (a channel, a neuron, a class logit), splits the keys into batches and merges the results.
The parameterisation, the transforms and why batching does not change results are described in
:mod:`cnnlens.views.maximize`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cnnlens.capture import DifferentiableCapture, differentiable_capture, resolve_layer
from cnnlens.errors import InputShapeError, OptionError, TargetError
from cnnlens.models import LoadedModel
from cnnlens.outputs import OutputSelector
from cnnlens.views._common import (
    Normalization,
    fixed_input_hw,
    intra_op_threads,
    model_device,
    normalization_of,
    unwrap,
)
from cnnlens.views.objectives import Objective, ObjectiveInputs
from cnnlens.views.parameterization import ParameterizationFactory, fourier
from cnnlens.views.transforms import BatchRandom, Transform, standard_transforms

__all__ = ["MaximizeResult", "Progress", "TransformSpec", "image_seed", "optimize"]

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

    Longer than 80 lines on purpose: one optimisation loop whose state (parameterisation, optimiser, per-image
    generators, the differentiable capture and the restored thread count) lives exactly as long as the loop.

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
        >>> from cnnlens.views.objectives import channel
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
    # a Keras 'caffe' model takes BGR: the RGB image is reversed before its (BGR-ordered) normalisation
    bgr = normalization is None and isinstance(model, LoadedModel) and model.spec.preprocessing.mode == "caffe"
    generators = [torch.Generator().manual_seed(image_seed(seed, k)) for k in key_list]
    image = factory(generators, hw, device)
    rng = BatchRandom(generators)
    optimizer = torch.optim.Adam(image.parameters, lr=lr)
    batch = len(key_list)
    history = torch.zeros(steps, batch)
    layers = sorted(objective.layers)
    started = time.perf_counter()

    fixed = fixed_input_hw(module)

    def scores_of(images: torch.Tensor, view: torch.Tensor, cap: DifferentiableCapture) -> torch.Tensor:
        if fixed is not None and tuple(view.shape[-2:]) != fixed:  # a Keras model built for one input size
            view = F.interpolate(view, size=fixed, mode="bilinear", align_corners=False)
        rec = cap.run_graph(((view.flip(1) if bgr else view) - mean_t) / std_t)
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
