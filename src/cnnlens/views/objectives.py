"""Objectives for activation maximisation, with an algebra: sum, weight and negate them.

An objective maps what one forward produced (the recorded activations, the logits and the image itself)
to **one score per image** ``(B,)``. The optimiser maximises the sum of the scores; because each image's
score depends on that image only, images optimised together in one batch do not influence each other.

Building blocks (Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017):

* :func:`channel`: ``S_b = (1 / hw) sum_ij A[b, c_b, i, j]``, the mean activation of channel ``c_b``;
* :func:`neuron`: ``S_b = A[b, c_b, y, x]``, one position (the centre by default);
* :func:`class_logit`: ``S_b = z[b, k_b]``, a class logit;
* :func:`total_variation` and :func:`l2`: image penalties, ``TV = mean |dI/dy| + mean |dI/dx|`` and
  ``L2 = mean (I - 1/2)^2`` on the image in ``[0, 1]``; subtract them with a weight.

Each channel/class argument is one index for every image or one index per image (the batched case:
image b maximises channel ``c_b``). Objectives combine with ``+``, ``-``, unary ``-``, ``*`` and ``/`` by a
number, and ``sum()``.

Example:
    >>> obj = channel("blocks.3", [0, 1, 2]) - 0.05 * total_variation()
    >>> obj.name
    'channel blocks.3:[0, 1, 2] - 0.05 * total variation'
    >>> sorted(obj.layers)
    ['blocks.3']
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cnnlens.errors import LayerError, TargetError

__all__ = [
    "ChannelObjective",
    "ClassLogitObjective",
    "L2Penalty",
    "NeuronObjective",
    "Objective",
    "ObjectiveInputs",
    "ScaledObjective",
    "SumObjective",
    "TotalVariationPenalty",
    "channel",
    "class_logit",
    "l2",
    "neuron",
    "total_variation",
]


@dataclass(frozen=True)
class ObjectiveInputs:
    """What an objective reads from one step.

    Attributes:
        activations: Layer key -> ``(B, C, h, w)`` (or ``(B, C)``) activations, attached to the graph.
        logits: ``(B, K)`` logits, or None when the forward stopped after the last needed layer.
        image: ``(B, 3, H, W)`` the images in ``[0, 1]`` before the robustness transforms.
    """

    activations: Mapping[str, torch.Tensor]
    logits: torch.Tensor | None
    image: torch.Tensor

    @property
    def batch(self) -> int:
        """The number of images."""
        return int(self.image.shape[0])


class Objective(ABC):
    """A score per image ``(B,)`` to maximise; combine objectives with ``+``, ``-``, ``*``, ``/``."""

    @property
    @abstractmethod
    def layers(self) -> frozenset[str]:
        """The layers whose activations the objective reads."""

    @property
    def needs_logits(self) -> bool:
        """Whether the objective reads the logits (then the whole network runs)."""
        return False

    @property
    @abstractmethod
    def name(self) -> str:
        """A readable description."""

    @abstractmethod
    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """Return the score of each image, ``(B,)``."""

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, (int, float)):
            if other == 0:
                return self
            raise TypeError("add objectives to objectives; a constant does not change what is maximised.")
        if not isinstance(other, Objective):
            return NotImplemented
        return SumObjective((self, other))

    def __radd__(self, other: Objective | float) -> Objective:  # supports sum([...])
        return self.__add__(other)

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return SumObjective((self, ScaledObjective(other, -1.0)))

    def __neg__(self) -> Objective:
        return ScaledObjective(self, -1.0)

    def __mul__(self, weight: float) -> Objective:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return NotImplemented
        return ScaledObjective(self, float(weight))

    def __rmul__(self, weight: float) -> Objective:
        return self.__mul__(weight)

    def __truediv__(self, weight: float) -> Objective:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight == 0:
            raise TypeError(f"an objective can be divided by a non-zero number, not {weight!r}.")
        return ScaledObjective(self, 1.0 / float(weight))

    def __repr__(self) -> str:
        return f"<Objective {self.name}>"


def _per_image(index: tuple[int, ...], batch: int, what: str) -> torch.Tensor:
    if len(index) == 1:
        return torch.full((batch,), index[0], dtype=torch.long)
    if len(index) != batch:
        raise TargetError(
            f"the objective has {len(index)} {what} indices for a batch of {batch} images; give one index for all "
            "images or exactly one per image."
        )
    return torch.tensor(index, dtype=torch.long)


def _indices(values: int | Sequence[int], what: str) -> tuple[int, ...]:
    out = (int(values),) if isinstance(values, int) else tuple(int(v) for v in values)
    if not out:
        raise TargetError(f"give at least one {what} index.")
    if any(v < 0 for v in out):
        raise TargetError(f"{what} indices must be non-negative; got {list(out)}.")
    return out


def _show(index: tuple[int, ...]) -> str:
    return str(index[0]) if len(index) == 1 else str(list(index))


def _activation(inputs: ObjectiveInputs, layer: str, index: tuple[int, ...], what: str) -> tuple[torch.Tensor, int]:
    try:
        act = inputs.activations[layer]
    except KeyError:
        raise LayerError(f"the objective reads layer {layer!r}, which was not recorded.") from None
    if act.ndim < 2:
        raise LayerError(f"layer {layer!r} outputs shape {tuple(act.shape)}; an objective needs (B, C, ...).")
    n_channels = int(act.shape[1])
    if max(index) >= n_channels:
        raise LayerError(
            f"{what} {max(index)} is out of range: layer {layer!r} has {n_channels} channels (0..{n_channels - 1})."
        )
    return act, n_channels


@dataclass(frozen=True, repr=False)
class ChannelObjective(Objective):
    """Mean activation of a channel: ``S_b = (1 / hw) sum_ij A[b, c_b, i, j]`` (see :func:`channel`)."""

    layer: str
    channels: tuple[int, ...]

    @property
    def layers(self) -> frozenset[str]:
        """The layer read."""
        return frozenset({self.layer})

    @property
    def name(self) -> str:
        """E.g. ``channel blocks.3:7``."""
        return f"channel {self.layer}:{_show(self.channels)}"

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """Mean activation of each image's channel."""
        act, _ = _activation(inputs, self.layer, self.channels, "channel")
        idx = _per_image(self.channels, int(act.shape[0]), "channel").to(act.device)
        picked = act[torch.arange(act.shape[0], device=act.device), idx]
        return picked.flatten(1).mean(dim=1) if picked.ndim > 1 else picked


@dataclass(frozen=True, repr=False)
class NeuronObjective(Objective):
    """One neuron: ``S_b = A[b, c_b, y, x]``, the centre position by default (see :func:`neuron`)."""

    layer: str
    channels: tuple[int, ...]
    y: int | None = None
    x: int | None = None

    @property
    def layers(self) -> frozenset[str]:
        """The layer read."""
        return frozenset({self.layer})

    @property
    def name(self) -> str:
        """E.g. ``neuron blocks.3:7@centre``."""
        where = "centre" if self.y is None and self.x is None else f"({self.y}, {self.x})"
        return f"neuron {self.layer}:{_show(self.channels)}@{where}"

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """Activation of each image's channel at one position."""
        act, _ = _activation(inputs, self.layer, self.channels, "channel")
        if act.ndim != 4:
            raise LayerError(f"a neuron objective needs a feature map (B, C, h, w); {self.layer!r} gives {act.ndim}-D.")
        h, w = int(act.shape[2]), int(act.shape[3])
        y = h // 2 if self.y is None else self.y
        x = w // 2 if self.x is None else self.x
        if not (0 <= y < h and 0 <= x < w):
            raise LayerError(f"neuron position ({y}, {x}) is outside layer {self.layer!r}'s {h}x{w} map.")
        idx = _per_image(self.channels, int(act.shape[0]), "channel").to(act.device)
        return act[torch.arange(act.shape[0], device=act.device), idx, y, x]


@dataclass(frozen=True, repr=False)
class ClassLogitObjective(Objective):
    """A class logit: ``S_b = z[b, k_b]`` (see :func:`class_logit`)."""

    classes: tuple[int, ...]

    @property
    def layers(self) -> frozenset[str]:
        """No layer: the logits."""
        return frozenset()

    @property
    def needs_logits(self) -> bool:
        """Always."""
        return True

    @property
    def name(self) -> str:
        """E.g. ``logit 207``."""
        return f"logit {_show(self.classes)}"

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """Each image's class logit."""
        logits = inputs.logits
        if logits is None or logits.ndim != 2:
            raise TargetError("a class-logit objective needs (B, K) logits from the full forward.")
        if max(self.classes) >= logits.shape[1]:
            raise TargetError(f"class {max(self.classes)} is out of range for a model with {logits.shape[1]} classes.")
        idx = _per_image(self.classes, int(logits.shape[0]), "class").to(logits.device)
        return logits[torch.arange(logits.shape[0], device=logits.device), idx]


@dataclass(frozen=True, repr=False)
class TotalVariationPenalty(Objective):
    """Anisotropic total variation of the image: ``TV_b = mean |I[y+1] - I[y]| + mean |I[x+1] - I[x]|``."""

    @property
    def layers(self) -> frozenset[str]:
        """No layer: the image."""
        return frozenset()

    @property
    def name(self) -> str:
        """``total variation``."""
        return "total variation"

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """Each image's total variation (a penalty: subtract it)."""
        img = inputs.image
        dy = (img[:, :, 1:, :] - img[:, :, :-1, :]).abs().flatten(1).mean(dim=1)
        dx = (img[:, :, :, 1:] - img[:, :, :, :-1]).abs().flatten(1).mean(dim=1)
        return dy + dx


@dataclass(frozen=True, repr=False)
class L2Penalty(Objective):
    """Mean squared distance of the image from a constant: ``L2_b = mean (I - centre)^2``."""

    centre: float = 0.5

    @property
    def layers(self) -> frozenset[str]:
        """No layer: the image."""
        return frozenset()

    @property
    def name(self) -> str:
        """``l2``."""
        return "l2"

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """Each image's mean squared distance from ``centre`` (a penalty: subtract it)."""
        return (inputs.image - self.centre).pow(2).flatten(1).mean(dim=1)


@dataclass(frozen=True, repr=False)
class ScaledObjective(Objective):
    """``weight * objective``."""

    inner: Objective
    weight: float

    @property
    def layers(self) -> frozenset[str]:
        """The inner objective's layers."""
        return self.inner.layers

    @property
    def needs_logits(self) -> bool:
        """Whether the inner objective reads logits."""
        return self.inner.needs_logits

    @property
    def name(self) -> str:
        """E.g. ``-(l2)`` or ``0.1 * l2``."""
        if self.weight == -1.0:
            return f"-({self.inner.name})"
        return f"{self.weight:g} * {self.inner.name}"

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """The inner scores times the weight."""
        return self.weight * self.inner(inputs)


@dataclass(frozen=True, repr=False)
class SumObjective(Objective):
    """The sum of several objectives (nested sums are flattened)."""

    terms: tuple[Objective, ...]

    def __post_init__(self) -> None:
        flat: list[Objective] = []
        for term in self.terms:
            flat.extend(term.terms if isinstance(term, SumObjective) else (term,))
        object.__setattr__(self, "terms", tuple(flat))

    @property
    def layers(self) -> frozenset[str]:
        """Every term's layers."""
        return frozenset().union(*(t.layers for t in self.terms))

    @property
    def needs_logits(self) -> bool:
        """Whether any term reads logits."""
        return any(t.needs_logits for t in self.terms)

    @property
    def name(self) -> str:
        """The terms joined by ``+``/``-``."""
        text = self.terms[0].name
        for term in self.terms[1:]:
            if isinstance(term, ScaledObjective) and term.weight < 0:
                inner = term.inner.name if term.weight == -1.0 else f"{-term.weight:g} * {term.inner.name}"
                text += f" - {inner}"
            else:
                text += f" + {term.name}"
        return text

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """The sum of the terms' scores."""
        total = self.terms[0](inputs)
        for term in self.terms[1:]:
            total = total + term(inputs)
        return total


def channel(layer: str, channels: int | Sequence[int]) -> ChannelObjective:
    """Mean activation of a channel (one index for all images, or one per image).

    Formula: ``S_b = (1 / hw) sum_ij A[b, c_b, i, j]`` (Olah et al., Distill 2017, "channel" objective).

    Example:
        >>> channel("blocks.3", 7).name
        'channel blocks.3:7'
    """
    return ChannelObjective(layer, _indices(channels, "channel"))


def neuron(layer: str, channels: int | Sequence[int], y: int | None = None, x: int | None = None) -> NeuronObjective:
    """One neuron: channel ``c_b`` at position ``(y, x)`` of the layer's map (default: the centre).

    Formula: ``S_b = A[b, c_b, y, x]`` (Olah et al., Distill 2017, "neuron" objective).

    Example:
        >>> neuron("blocks.3", [1, 2]).name
        'neuron blocks.3:[1, 2]@centre'
    """
    return NeuronObjective(layer, _indices(channels, "channel"), y, x)


def class_logit(classes: int | Sequence[int]) -> ClassLogitObjective:
    """A class logit (not the softmax, which can be raised by lowering the other classes).

    Formula: ``S_b = z[b, k_b]``.

    Example:
        >>> class_logit(207).name
        'logit 207'
    """
    return ClassLogitObjective(_indices(classes, "class"))


def total_variation() -> TotalVariationPenalty:
    """Total variation of the image in ``[0, 1]``, a penalty to subtract (e.g. ``obj - 0.05 * tv``).

    Formula: ``TV_b = mean |I[:, y+1, x] - I[:, y, x]| + mean |I[:, y, x+1] - I[:, y, x]|`` (Mahendran &
    Vedaldi, CVPR 2015).
    """
    return TotalVariationPenalty()


def l2(centre: float = 0.5) -> L2Penalty:
    """Mean squared distance of the image from ``centre`` (a penalty: subtract it).

    Formula: ``L2_b = mean (I - centre)^2`` (Simonyan et al., ICLR workshop 2014).
    """
    return L2Penalty(float(centre))
