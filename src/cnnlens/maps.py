"""Post-processing of raw maps: ReLU, bilinear upsampling and per-sample min-max normalisation.

These are separate, explicit steps. Raw maps stay signed and at layer resolution in
:class:`cnnlens.explanation.Explanation`; the normalised maps are derived from them here. Normalisation is
per map: a map never depends on the other images of its batch. A map whose range vanishes (constant, all
zero, or holding non-finite values) becomes zeros with ``degenerate=True``: no NaN or inf ever leaves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DEGENERATE_RTOL", "finite_or_zero", "normalize", "precise_dtype", "upsample"]

DEGENERATE_RTOL = 1e-6
"""A map whose ``max - min`` is at most this fraction of ``max |value|`` is degenerate (flat)."""


def precise_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype cnnlens computes method weights in: float64, or float32 where float64 is unsupported (MPS)."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def finite_or_zero(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace maps holding any NaN/inf by zeros.

    Args:
        maps: ``(..., H, W)`` maps.

    Returns:
        ``(maps, bad)`` where ``bad`` is a bool tensor of shape ``maps.shape[:-2]`` marking replaced maps.
    """
    bad = ~torch.isfinite(maps).flatten(-2).all(dim=-1)
    if bool(bad.any()):
        maps = torch.where(bad[..., None, None], torch.zeros_like(maps), maps)
    return maps, bad


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize maps ``(..., h, w)`` to ``size`` (``align_corners=False``, pixel-centre aligned).

    Example:
        >>> upsample(torch.ones(2, 7, 7), (224, 224)).shape
        torch.Size([2, 224, 224])
    """
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    if tuple(flat.shape[-2:]) != tuple(size):
        flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return flat.reshape(*lead, *size)


def normalize(
    maps: torch.Tensor,
    rtol: float = DEGENERATE_RTOL,
    *,
    dtype: torch.dtype | None = None,
    assume_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max normalise each map ``(..., H, W)`` to [0, 1] on its own.

    Formula: ``(M - min M) / (max M - min M)``. A map with ``max - min <= rtol * max|M|`` (flat, all zero)
    or with non-finite values becomes all zeros and is flagged degenerate.

    Args:
        maps: ``(..., H, W)`` maps, in any floating dtype (the arithmetic runs in it).
        rtol: Relative flatness below which a map is degenerate.
        dtype: The dtype of the result (default: that of ``maps``); the cast is fused into the last step.
        assume_finite: Skip the NaN/inf check when the caller guarantees finite maps (e.g. upsampled from
            maps already passed through :func:`finite_or_zero`).

    Returns:
        ``(normalised, degenerate)``; ``degenerate`` has shape ``maps.shape[:-2]``.

    Example:
        >>> m, d = normalize(torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]]]))
        >>> m[0].tolist(), d.tolist()
        ([[0.0, 0.5], [0.25, 1.0]], [False, True])
    """
    if assume_finite:
        bad = torch.zeros(maps.shape[:-2], dtype=torch.bool, device=maps.device)
    else:
        maps, bad = finite_or_zero(maps)
    lo, hi = torch.aminmax(maps.flatten(-2), dim=-1)
    span = hi - lo
    scale = torch.maximum(lo.abs(), hi.abs())
    degenerate = bad | (span <= rtol * scale) | (scale == 0)
    # A degenerate map is divided by +inf: (M - min) is finite, so the result is exactly zero.
    span = span.masked_fill(degenerate, float("inf"))
    out = (maps - lo[..., None, None]).div_(span[..., None, None]).clamp_(0.0, 1.0)
    return (out if dtype is None else out.to(dtype)), degenerate
