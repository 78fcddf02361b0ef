"""Image parameterisations for activation maximisation: Fourier spectrum and decorrelated colour.

Optimising raw pixels yields high-frequency noise that excites a network without showing a pattern. The
Fourier parameterisation of Olah, Mordvintsev & Schubert ("Feature Visualization", Distill 2017; the
lucid/lucent ``fft_image`` and ``to_valid_rgb``) learns instead a spectrum whose frequencies are scaled
down as ``1 / f``, which whitens the gradient so that all frequencies learn at a similar rate, and a
colour in a decorrelated basis:

``I = sigmoid(C · irfft2(s(f) ⊙ theta) / 4)`` with ``s(f) = 1 / max(f, 1 / max(H, W))^d``,

where ``theta`` is the learned complex spectrum (``d = 1`` by default), ``irfft2`` is orthonormal and
``C`` is the square root of ImageNet's colour covariance (normalised so its largest column norm is 1).
The sigmoid maps to ``[0, 1]``; the model's own input normalisation is applied afterwards by the
optimiser. :func:`pixels` is the plain alternative (pixels through the same colour map and sigmoid).

Every image of a batch draws its initial values from its own ``torch.Generator``, so an image does not
depend on its batch position or on the other images.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cnnlens.errors import InputShapeError

__all__ = [
    "COLOR_CORRELATION_SQRT",
    "FourierImage",
    "ImageParameterization",
    "ParameterizationFactory",
    "PixelImage",
    "decorrelate_colors",
    "fourier",
    "pixels",
    "rfft2d_freqs",
]

COLOR_CORRELATION_SQRT: tuple[tuple[float, float, float], ...] = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)
"""Square root of ImageNet's RGB colour covariance (lucid's ``color_correlation_svd_sqrt``)."""


def _color_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    c = torch.tensor(COLOR_CORRELATION_SQRT, dtype=torch.float64)
    c = c / c.norm(dim=0).max()
    out: torch.Tensor = c.to(device=device, dtype=dtype)
    return out


def decorrelate_colors(x: torch.Tensor) -> torch.Tensor:
    """Map ``(B, 3, H, W)`` from the decorrelated colour basis to RGB: ``rgb = C · x`` per pixel.

    Example:
        >>> decorrelate_colors(torch.zeros(1, 3, 2, 2)).abs().max().item()
        0.0
    """
    c = _color_matrix(x.device, x.dtype)
    return torch.einsum("ij,bjhw->bihw", c, x)


class ImageParameterization(ABC):
    """A batch of images ``(B, 3, H, W)`` in ``[0, 1]`` as a differentiable function of learned tensors."""

    @property
    @abstractmethod
    def parameters(self) -> list[torch.Tensor]:
        """The learned tensors (leaves with ``requires_grad=True``)."""

    @abstractmethod
    def __call__(self) -> torch.Tensor:
        """The images ``(B, 3, H, W)`` in ``[0, 1]``."""


def rfft2d_freqs(h: int, w: int) -> torch.Tensor:
    """Spatial frequency magnitudes ``(h, w // 2 + 1)`` of a real 2-D FFT, in cycles per pixel."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class FourierImage(ImageParameterization):
    """Images parameterised by a ``1 / f``-scaled spectrum and decorrelated colour (see the module doc).

    Args:
        generators: One generator per image (initial values ``theta ~ N(0, sd^2)``).
        size: ``(H, W)``.
        sd: Standard deviation of the initial spectrum.
        decay_power: ``d`` in ``s(f) = 1 / max(f, 1 / max(H, W))^d``.
        decorrelate: Apply the colour decorrelation ``C``.
        device: Where the parameters live.
    """

    MAGIC = 4.0
    """lucid's constant that divides the spatial image before the sigmoid."""

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        size: tuple[int, int],
        *,
        sd: float = 0.01,
        decay_power: float = 1.0,
        decorrelate: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        h, w = size
        freqs = rfft2d_freqs(h, w)
        self.size = (h, w)
        self.decorrelate = decorrelate
        scale = 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power
        self.scale = scale.to(device=device, dtype=torch.float32)[None, None, :, :, None]
        init = [torch.randn((3, *freqs.shape, 2), generator=g, dtype=torch.float32) * sd for g in generators]
        self.spectrum = torch.stack(init).to(device).requires_grad_(True)

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The spectrum ``(B, 3, H, W // 2 + 1, 2)`` (real and imaginary parts)."""
        return [self.spectrum]

    def __call__(self) -> torch.Tensor:
        """``sigmoid(C · irfft2(s ⊙ theta) / 4)``."""
        h, w = self.size
        spectrum = torch.view_as_complex((self.scale * self.spectrum).contiguous())
        image = torch.fft.irfftn(spectrum, s=(h, w), dim=(2, 3), norm="ortho") / self.MAGIC
        if self.decorrelate:
            image = decorrelate_colors(image)
        return torch.sigmoid(image)


class PixelImage(ImageParameterization):
    """Images parameterised directly by pixels (through the colour map and sigmoid).

    Formula: ``I = sigmoid(C · theta)``, ``theta ~ N(0, sd^2)`` per image.
    """

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        size: tuple[int, int],
        *,
        sd: float = 0.01,
        decorrelate: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        init = [torch.randn((3, *size), generator=g, dtype=torch.float32) * sd for g in generators]
        self.decorrelate = decorrelate
        self.pixels = torch.stack(init).to(device).requires_grad_(True)

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The pixels ``(B, 3, H, W)`` before the colour map and sigmoid."""
        return [self.pixels]

    def __call__(self) -> torch.Tensor:
        """``sigmoid(C · theta)``."""
        image = decorrelate_colors(self.pixels) if self.decorrelate else self.pixels
        return torch.sigmoid(image)


ParameterizationFactory = Callable[[Sequence[torch.Generator], tuple[int, int], torch.device], ImageParameterization]
"""Builds a parameterisation for one generator per image, a size ``(H, W)`` and a device."""


@dataclass(frozen=True)
class fourier:  # noqa: N801 - used like a function: fourier(), fourier(decay_power=1.5)
    """Factory of :class:`FourierImage` (the default parameterisation).

    Example:
        >>> gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        >>> fourier()(gens, (32, 32), torch.device("cpu"))().shape
        torch.Size([2, 3, 32, 32])
    """

    sd: float = 0.01
    decay_power: float = 1.0
    decorrelate: bool = True

    def __call__(
        self, generators: Sequence[torch.Generator], size: tuple[int, int], device: torch.device
    ) -> ImageParameterization:
        """Build the parameterisation."""
        if not (math.isfinite(self.sd) and self.sd >= 0):
            raise InputShapeError(f"sd must be a finite non-negative number; got {self.sd}.")
        return FourierImage(
            generators, size, sd=self.sd, decay_power=self.decay_power, decorrelate=self.decorrelate, device=device
        )


@dataclass(frozen=True)
class pixels:  # noqa: N801 - used like a function
    """Factory of :class:`PixelImage`.

    Example:
        >>> pixels()([torch.Generator().manual_seed(0)], (8, 8), torch.device("cpu"))().shape
        torch.Size([1, 3, 8, 8])
    """

    sd: float = 0.01
    decorrelate: bool = True

    def __call__(
        self, generators: Sequence[torch.Generator], size: tuple[int, int], device: torch.device
    ) -> ImageParameterization:
        """Build the parameterisation."""
        return PixelImage(generators, size, sd=self.sd, decorrelate=self.decorrelate, device=device)
