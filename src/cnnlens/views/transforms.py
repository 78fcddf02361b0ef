"""Robustness transforms for activation maximisation: pad, jitter, scale, rotate, composed.

Each step of the optimisation shows the network a randomly transformed copy of every image, so only
patterns that survive small shifts, zooms and rotations are reinforced ("transformation robustness",
Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017; Mordvintsev et al., "Inceptionism",
2015). Transforms act on images in ``[0, 1]`` before the model's normalisation.

A transform is a callable ``(images (B, 3, H, W), rng) -> images``. The randomness comes from
:class:`BatchRandom`, which holds one ``torch.Generator`` per image and draws every random number of image
``b`` from generator ``b``: an image's transforms depend on its own seed only, never on its batch position.
All transforms keep images of a batch at a common size (so they can run as one batch); areas uncovered by a
zoom-out or a rotation are filled with grey 0.5.

Example:
    >>> rng = BatchRandom.from_seeds([0, 1])
    >>> t = compose(pad(4), jitter(4), random_scale([0.9, 1.0, 1.1]), random_rotate(range(-5, 6)))
    >>> t(torch.rand(2, 3, 32, 32), rng).shape
    torch.Size([2, 3, 36, 36])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlens.errors import InputShapeError

__all__ = [
    "BatchRandom",
    "Transform",
    "compose",
    "jitter",
    "pad",
    "random_rotate",
    "random_scale",
    "standard_transforms",
]


class BatchRandom:
    """One ``torch.Generator`` per image; each draw returns one value per image from its own generator."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Iterable[int]) -> BatchRandom:
        """Generators seeded with the given integers (one per image)."""
        return cls([torch.Generator().manual_seed(int(s)) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def integers(self, low: int, high: int) -> list[int]:
        """One integer per image, uniform in ``[low, high]`` (inclusive)."""
        return [int(torch.randint(low, high + 1, (1,), generator=g)) for g in self.generators]

    def choice(self, values: Sequence[float]) -> list[float]:
        """One element of ``values`` per image, uniformly."""
        return [float(values[i]) for i in self.integers(0, len(values) - 1)]


Transform = Callable[[torch.Tensor, BatchRandom], torch.Tensor]
"""``(images (B, 3, H, W), rng) -> images``."""


def _check(x: torch.Tensor, rng: BatchRandom, who: str) -> None:
    if x.ndim != 4:
        raise InputShapeError(f"{who} expects images (B, C, H, W); got shape {tuple(x.shape)}.")
    if len(rng) != x.shape[0]:
        raise InputShapeError(f"{who}: {len(rng)} random generators for {x.shape[0]} images; give one per image.")


@dataclass(frozen=True)
class pad:  # noqa: N801 - used like a function: pad(12)
    """Pad every side by ``pixels`` with a constant (grey 0.5 by default) or by reflection.

    Example:
        >>> pad(2)(torch.zeros(1, 3, 4, 4), BatchRandom.from_seeds([0])).shape
        torch.Size([1, 3, 8, 8])
    """

    pixels: int
    mode: str = "constant"
    value: float = 0.5

    def __call__(self, x: torch.Tensor, rng: BatchRandom) -> torch.Tensor:
        """Pad the images."""
        _check(x, rng, "pad")
        if self.pixels <= 0:
            return x
        p = (self.pixels,) * 4
        if self.mode == "constant":
            return F.pad(x, p, mode="constant", value=self.value)
        return F.pad(x, p, mode=self.mode)


@dataclass(frozen=True)
class jitter:  # noqa: N801 - used like a function: jitter(8)
    """Random crop: each image is cut to ``(H - d, W - d)`` at its own random offset in ``[0, d]``.

    Example:
        >>> jitter(3)(torch.zeros(2, 3, 10, 10), BatchRandom.from_seeds([0, 1])).shape
        torch.Size([2, 3, 7, 7])
    """

    pixels: int

    def __call__(self, x: torch.Tensor, rng: BatchRandom) -> torch.Tensor:
        """Crop each image at its own offset."""
        _check(x, rng, "jitter")
        d = self.pixels
        if d <= 0:
            return x
        h, w = int(x.shape[2]) - d, int(x.shape[3]) - d
        if h < 1 or w < 1:
            raise InputShapeError(f"jitter({d}) is larger than the {x.shape[2]}x{x.shape[3]} images.")
        dy = rng.integers(0, d)
        dx = rng.integers(0, d)
        return torch.stack([x[b, :, dy[b] : dy[b] + h, dx[b] : dx[b] + w] for b in range(x.shape[0])])


def _affine(x: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    """Resample each image with its own ``(2, 3)`` affine map (bilinear), outside filled with ``fill``."""
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


@dataclass(frozen=True)
class random_scale:  # noqa: N801 - used like a function
    """Zoom each image about its centre by a factor chosen from ``scales`` (size unchanged).

    A factor ``s > 1`` enlarges the content: output pixel ``p`` samples the input at ``c + (p - c) / s``.
    """

    scales: Sequence[float]
    fill: float = 0.5

    def __call__(self, x: torch.Tensor, rng: BatchRandom) -> torch.Tensor:
        """Zoom each image by its own factor."""
        _check(x, rng, "random_scale")
        factors = rng.choice(list(self.scales))
        if all(s == 1.0 for s in factors):
            return x
        theta = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64)
        inv = torch.tensor([1.0 / s for s in factors], dtype=torch.float64)
        theta[:, 0, 0] = inv
        theta[:, 1, 1] = inv
        return _affine(x, theta, self.fill)


@dataclass(frozen=True)
class random_rotate:  # noqa: N801 - used like a function
    """Rotate each image about its centre by an angle in degrees chosen from ``angles`` (size unchanged)."""

    angles: Sequence[float]
    fill: float = 0.5

    def __call__(self, x: torch.Tensor, rng: BatchRandom) -> torch.Tensor:
        """Rotate each image by its own angle."""
        _check(x, rng, "random_rotate")
        angles = rng.choice(list(self.angles))
        if all(a == 0.0 for a in angles):
            return x
        rad = torch.tensor([math.radians(a) for a in angles], dtype=torch.float64)
        cos, sin = torch.cos(rad), torch.sin(rad)
        h, w = int(x.shape[2]), int(x.shape[3])
        theta = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64)
        # Normalised coordinates stretch x and y differently for non-square images; correct by the aspect.
        theta[:, 0, 0] = cos
        theta[:, 0, 1] = -sin * h / w
        theta[:, 1, 0] = sin * w / h
        theta[:, 1, 1] = cos
        return _affine(x, theta, self.fill)


@dataclass(frozen=True)
class compose:  # noqa: N801 - used like a function: compose(pad(12), jitter(8))
    """Apply transforms in order."""

    transforms: tuple[Transform, ...]

    def __init__(self, *transforms: Transform) -> None:
        object.__setattr__(self, "transforms", tuple(transforms))

    def __call__(self, x: torch.Tensor, rng: BatchRandom) -> torch.Tensor:
        """Apply each transform in turn."""
        for transform in self.transforms:
            x = transform(x, rng)
        return x


def standard_transforms(size: int = 224) -> compose:
    """The transforms of lucid's ``standard_transforms``, pixel amounts scaled to the size (224 px reference).

    ``pad(12), jitter(8), random_scale(1 + (i - 5) / 50 for i in 0..10), random_rotate(-10..10 degrees),
    jitter(4)`` at 224 px; pad and jitter shrink proportionally for smaller images.

    Example:
        >>> len(standard_transforms().transforms)
        5
    """
    f = max(size, 1) / 224.0
    return compose(
        pad(max(1, round(12 * f))),
        jitter(max(1, round(8 * f))),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),
        random_rotate(list(range(-10, 11))),
        jitter(max(1, round(4 * f))),
    )
