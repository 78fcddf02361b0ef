"""Shared plumbing of the metrics: argument checking, input/map/target preparation, the masking space.

Everything here works on torch tensors on the model's device. Nothing here runs a model; forwards live in
:mod:`cnnlens.metrics._forward`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

import torch
from torch import nn

from cnnlens.errors import CnnlensError, InputShapeError, ModelTypeError, TargetError
from cnnlens.explanation import Explanation
from cnnlens.maps import upsample
from cnnlens.models import LoadedModel

__all__ = [
    "ClassSpec",
    "MeanStd",
    "MetricError",
    "ModelLike",
    "Normalization",
    "Saliency",
    "Space",
    "check_choice",
    "check_positive_int",
    "module_of",
    "prepare_inputs",
    "prepare_maps",
    "resolve_normalization",
]

Space = Literal["normalized", "pixel"]
"""Where an image is multiplied, imputed or blended.

``"normalized"``: the model-input tensor ``x = (p - mean) / std`` itself (0 is the dataset mean colour);
``"pixel"``: the ``[0, 1]`` image ``p = x * std + mean`` (0 is black), normalised again before the forward.
"""

ModelLike: TypeAlias = "nn.Module | LoadedModel"
Saliency: TypeAlias = "torch.Tensor | Explanation"
ClassSpec: TypeAlias = "int | Sequence[int] | torch.Tensor | None"


class MetricError(CnnlensError, ValueError):
    """A metric's options or inputs do not fit together (space without normalisation, empty box, bad step...)."""


class MeanStd(Protocol):
    """Anything with per-channel ``mean`` and ``std`` (a :class:`cnnlens.models.Preprocessing`, for instance)."""

    @property
    def mean(self) -> Sequence[float]: ...

    @property
    def std(self) -> Sequence[float]: ...


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation ``x = (p - mean) / std`` between pixel space and model-input space.

    A single mean/std value applies to every channel.

    The inverse is exact (no clamping), so ``to_model(to_pixel(x)) == x`` up to float rounding even for inputs
    outside the ``[0, 1]`` image range.

    Example:
        >>> n = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> n.to_pixel(torch.zeros(1, 3, 1, 1)).flatten().tolist()
        [0.5, 0.5, 0.5]
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = int(x.shape[-3])
        mean_values = self.mean * channels if len(self.mean) == 1 else self.mean
        std_values = self.std * channels if len(self.std) == 1 else self.std
        if len(mean_values) != channels or len(std_values) != channels:
            raise MetricError(
                f"the normalisation has {len(self.mean)} channel means and {len(self.std)} stds but the inputs have "
                f"{channels} channels; pass mean/std with one value per input channel."
            )
        shape = (channels, 1, 1)
        mean = torch.tensor(mean_values, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(std_values, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def to_pixel(self, x: torch.Tensor) -> torch.Tensor:
        """Model-input tensor -> ``[0, 1]`` pixel values: ``x * std + mean``."""
        mean, std = self._stats(x)
        return x * std + mean

    def to_model(self, p: torch.Tensor) -> torch.Tensor:
        """Pixel values -> model-input tensor: ``(p - mean) / std``."""
        mean, std = self._stats(p)
        return (p - mean) / std

    def std_of(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel std as a ``(C, 1, 1)`` tensor like ``x``."""
        return self._stats(x)[1]


def _floats(values: object, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (float(values),)
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or not values:
        raise MetricError(f"{what} must be a number or a sequence of numbers (one per channel), got {values!r}.")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise MetricError(f"{what} must be finite, got {out}.")
    return out


def resolve_normalization(
    model: ModelLike,
    *,
    preprocessing: MeanStd | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> Normalization | None:
    """The normalisation to use: explicit ``mean``/``std``, else ``preprocessing``, else a LoadedModel's.

    Returns None when nothing tells how the inputs were normalised.

    Raises:
        MetricError: When only one of ``mean``/``std`` is given, or a std is not positive.
    """
    if (mean is None) != (std is None):
        raise MetricError("give both mean= and std= (the per-channel input normalisation), or neither.")
    if mean is not None and std is not None:
        m, s = _floats(mean, "mean"), _floats(std, "std")
    elif preprocessing is not None:
        m, s = _floats(preprocessing.mean, "preprocessing.mean"), _floats(preprocessing.std, "preprocessing.std")
    elif isinstance(model, LoadedModel):
        pre = model.spec.preprocessing
        m, s = _floats(pre.mean, "preprocessing.mean"), _floats(pre.std, "preprocessing.std")
    else:
        return None
    if len(m) == 1 and len(s) > 1:
        m = m * len(s)
    if len(s) == 1 and len(m) > 1:
        s = s * len(m)
    if len(m) != len(s):
        raise MetricError(f"mean has {len(m)} values and std {len(s)}; give one of each per channel.")
    if any(v <= 0 for v in s):
        raise MetricError(f"std values must be positive, got {s}.")
    return Normalization(m, s)


def need_normalization(norm: Normalization | None, why: str) -> Normalization:
    """``norm``, or a clear error saying how to provide it."""
    if norm is None:
        raise MetricError(
            f"{why} needs to know how the inputs were normalised: pass a cnnlens LoadedModel, or "
            "options=MetricOptions(preprocessing=<object with mean and std>) or MetricOptions(mean=(...), "
            "std=(...)) (use mean=0, std=1 for inputs that are plain [0, 1] images), or choose space='normalized'."
        )
    return norm


def check_choice(value: object, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``, else a MetricError naming them."""
    if not isinstance(value, str) or value not in choices:
        raise MetricError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def check_positive_int(value: object, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (or None when allowed), else a MetricError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MetricError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def module_of(model: ModelLike) -> nn.Module:
    """The ``nn.Module`` of a model or LoadedModel, or a clear error."""
    module = model.module if isinstance(model, LoadedModel) else model
    if not isinstance(module, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module or a LoadedModel, got {type(model).__name__}.")
    return module


def prepare_inputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` floating inputs on the model's device and dtype (one ``(C, H, W)`` image is batched)."""
    if not isinstance(inputs, torch.Tensor):
        raise InputShapeError(f"inputs must be a tensor (B, C, H, W), got {type(inputs).__name__}.")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4 or inputs.shape[0] < 1 or inputs.shape[-1] < 1 or inputs.shape[-2] < 1:
        raise InputShapeError(
            f"metrics need an image batch (B, C, H, W) or one image (C, H, W); got shape {tuple(inputs.shape)}."
        )
    param = next(module.parameters(), None)
    x = inputs.detach()
    if not x.is_floating_point():
        x = x.float()
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    if not bool(torch.isfinite(x).all()):
        raise InputShapeError("the inputs hold NaN or inf values; metrics need finite images.")
    return x.clone() if x.is_inference() else x


def prepare_maps(
    saliency: Saliency,
    batch: int,
    size: tuple[int, int],
    device: torch.device,
    *,
    target_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Saliency maps as ``(B, H, W)`` float64 at input resolution, and the Explanation's classes if any.

    Accepts ``(B, H, W)``, ``(B, 1, H, W)``, one ``(H, W)`` map when B == 1, or an :class:`Explanation`
    (its normalised ``maps[:, target_index]`` and ``target_classes[:, target_index]``). Maps at another
    resolution are upsampled bilinearly (``align_corners=False``, :func:`cnnlens.maps.upsample`).

    Raises:
        InputShapeError: Wrong shape, batch size, or non-finite values.
    """
    classes: torch.Tensor | None = None
    if isinstance(saliency, Explanation):
        saliency.require_images("faithfulness metrics (Average Drop, deletion/insertion, ROAD)")
        if not 0 <= target_index < saliency.num_targets:
            raise InputShapeError(
                f"target_index {target_index} is out of range for an Explanation with {saliency.num_targets} "
                "target(s) per image."
            )
        maps = saliency.maps[:, target_index]
        classes = saliency.target_classes[:, target_index]
    elif isinstance(saliency, torch.Tensor):
        maps = saliency
    else:
        raise InputShapeError(
            f"saliency must be a tensor of maps (B, H, W) or an Explanation, got {type(saliency).__name__}."
        )
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim == 2 and batch == 1:
        maps = maps.unsqueeze(0)
    if maps.ndim != 3 or maps.shape[0] != batch or maps.shape[-1] < 1 or maps.shape[-2] < 1:
        raise InputShapeError(
            f"saliency maps must be (B, H, W) with B = {batch} (the number of input images); got shape "
            f"{tuple(maps.shape)}."
        )
    maps = maps.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(maps).all()):
        raise InputShapeError("the saliency maps hold NaN or inf values; pass finite maps.")
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = upsample(maps, size)
    return maps, classes


def resolve_classes(
    targets: ClassSpec,
    explained: torch.Tensor | None,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Target classes ``(B,)``: given ones, else the Explanation's, else the model's top class.

    Raises:
        TargetError: Wrong count, out of range, or custom (non-class) targets.
    """
    batch, num_classes = int(logits.shape[0]), int(logits.shape[1])
    if targets is None:
        classes = explained if explained is not None else logits.argmax(dim=1)
    elif isinstance(targets, bool):
        raise TargetError("a target class cannot be a bool; give a class index.")
    elif isinstance(targets, int):
        classes = torch.full((batch,), int(targets), dtype=torch.long)
    elif isinstance(targets, torch.Tensor):
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TargetError(f"target tensors hold class indices; got dtype {targets.dtype}.")
        classes = targets.expand(batch) if targets.ndim == 0 else targets
    elif isinstance(targets, Sequence) and not isinstance(targets, (str, bytes)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in targets):
            raise TargetError("metrics take class indices as targets: an int, a list of ints or an index tensor.")
        classes = torch.tensor(list(targets), dtype=torch.long)
    else:
        raise TargetError(
            f"cannot use {type(targets).__name__} as metric targets; give an int, one int per image, an index "
            "tensor, or None (the Explanation's classes, else the top class)."
        )
    classes = classes.to(device=logits.device, dtype=torch.long)
    if classes.ndim != 1 or classes.shape[0] != batch:
        raise TargetError(f"got target classes of shape {tuple(classes.shape)} for a batch of {batch} images.")
    if bool(((classes < 0) | (classes >= num_classes)).any()):
        bad = int(classes[(classes < 0) | (classes >= num_classes)][0])
        raise TargetError(
            f"target class {bad} is out of range for a model with {num_classes} outputs (custom, non-class targets "
            "have index -1 and cannot be scored by a metric); pass targets= explicitly."
        )
    return classes
