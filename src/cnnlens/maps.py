"""Post-processing of raw maps: ReLU, bilinear (trilinear) upsampling and per-sample min-max normalisation.

These are separate, explicit steps. Maps are images ``(..., h, w)`` or volumes ``(..., d, h, w)`` (from
``Conv3d`` networks): the number of spatial dimensions is the length of the target ``size`` (or
``spatial_dims``), everything before them is leading batch/target dimensions. Raw maps stay signed and at
layer resolution in :class:`cnnlens.explanation.Explanation`; the normalised maps are derived from them
here. Normalisation is per map: a map never depends on the other images of its batch. A map whose range
vanishes (constant, all zero, or holding non-finite values) becomes zeros with ``degenerate=True``: no NaN or
inf ever leaves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cnnlens.errors import InputShapeError

__all__ = ["DEGENERATE_RTOL", "finite_or_zero", "normalize", "precise_dtype", "upsample", "upsample_normalize"]

DEGENERATE_RTOL = 1e-6
"""A map whose ``max - min`` is at most this fraction of ``max |value|`` is degenerate (flat)."""


def precise_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype cnnlens computes method weights in: float64, or float32 where float64 is unsupported (MPS)."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def _check_spatial_dims(maps: torch.Tensor, spatial_dims: int) -> None:
    if spatial_dims not in (2, 3) or maps.ndim < spatial_dims:
        raise InputShapeError(
            f"maps have 2 (h, w) or 3 (d, h, w) spatial dimensions; got spatial_dims={spatial_dims} for maps of "
            f"shape {tuple(maps.shape)}."
        )


def _expand(values: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Per-map values ``(...)`` viewed as ``(..., 1, 1)`` (``(..., 1, 1, 1)`` for volumes) to broadcast."""
    return values.reshape(*values.shape, *([1] * spatial_dims))


def finite_or_zero(maps: torch.Tensor, *, spatial_dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace maps holding any NaN/inf by zeros.

    Args:
        maps: ``(..., H, W)`` maps, or ``(..., D, H, W)`` volumes with ``spatial_dims=3``.
        spatial_dims: How many trailing dimensions make one map (2 or 3).

    Returns:
        ``(maps, bad)`` where ``bad`` is a bool tensor of shape ``maps.shape[:-spatial_dims]`` marking replaced
        maps.

    Example:
        >>> m = torch.zeros(2, 1, 2, 2); m[1, 0, 1, 1] = float("nan")
        >>> finite_or_zero(m, spatial_dims=3)[1].tolist()
        [False, True]
    """
    _check_spatial_dims(maps, spatial_dims)
    bad = ~torch.isfinite(maps).flatten(-spatial_dims).all(dim=-1)
    if bool(bad.any()):
        maps = torch.where(_expand(bad, spatial_dims), torch.zeros_like(maps), maps)
    return maps, bad


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize maps ``(..., h, w)`` bilinearly, or volumes ``(..., d, h, w)`` trilinearly, to ``size``.

    ``size`` is ``(H, W)`` or ``(D, H, W)``; its length says how many trailing dimensions are spatial. Both use
    ``align_corners=False`` (pixel/voxel-centre aligned).

    Example:
        >>> upsample(torch.ones(2, 7, 7), (224, 224)).shape
        torch.Size([2, 224, 224])
        >>> upsample(torch.ones(2, 4, 7, 7), (16, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """
    spatial = len(size)
    _check_spatial_dims(maps, spatial)
    lead = maps.shape[:-spatial]
    flat = maps.reshape(-1, 1, *maps.shape[-spatial:])
    if tuple(flat.shape[-spatial:]) != tuple(size):
        mode = "bilinear" if spatial == 2 else "trilinear"
        flat = F.interpolate(flat, size=tuple(size), mode=mode, align_corners=False)
    return flat.reshape(*lead, *size)


def normalize(
    maps: torch.Tensor,
    rtol: float = DEGENERATE_RTOL,
    *,
    dtype: torch.dtype | None = None,
    assume_finite: bool = False,
    spatial_dims: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max normalise each map ``(..., H, W)`` (or volume ``(..., D, H, W)``) to [0, 1] on its own.

    Formula: ``(M - min M) / (max M - min M)``. A map with ``max - min <= rtol * max|M|`` (flat, all zero)
    or with non-finite values becomes all zeros and is flagged degenerate.

    Args:
        maps: ``(..., H, W)`` maps, in any floating dtype (the arithmetic runs in it).
        rtol: Relative flatness below which a map is degenerate.
        dtype: The dtype of the result (default: that of ``maps``); the cast is fused into the last step.
        assume_finite: Skip the NaN/inf check when the caller guarantees finite maps (e.g. upsampled from
            maps already passed through :func:`finite_or_zero`).
        spatial_dims: How many trailing dimensions make one map: 2, or 3 for volumes.

    Returns:
        ``(normalised, degenerate)``; ``degenerate`` has shape ``maps.shape[:-spatial_dims]``.

    Example:
        >>> m, d = normalize(torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]]]))
        >>> m[0].tolist(), d.tolist()
        ([[0.0, 0.5], [0.25, 1.0]], [False, True])
    """
    _check_spatial_dims(maps, spatial_dims)
    if assume_finite:
        bad = torch.zeros(maps.shape[:-spatial_dims], dtype=torch.bool, device=maps.device)
    else:
        maps, bad = finite_or_zero(maps, spatial_dims=spatial_dims)
    out, degenerate, _ = _min_max(maps, bad, rtol, spatial_dims)
    return (out if dtype is None else out.to(dtype)), degenerate


def _min_max(
    maps: torch.Tensor, bad: torch.Tensor, rtol: float, spatial_dims: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalisation itself on finite maps: ``(normalised, degenerate, span / max|M|)``."""
    flat = maps.flatten(-spatial_dims)
    # amin and amax, not aminmax(dim=): CPU aminmax along a dim is a scalar loop (17x slower on a 224x224 map).
    lo, hi = flat.amin(dim=-1), flat.amax(dim=-1)
    span = hi - lo
    scale = torch.maximum(lo.abs(), hi.abs())
    degenerate = bad | (span <= rtol * scale) | (scale == 0)
    relative_span = span / scale.masked_fill(scale == 0, 1.0)
    # A degenerate map is divided by +inf: (M - min) is finite, so the result is exactly zero.
    span = span.masked_fill(degenerate, float("inf"))
    out = (maps - _expand(lo, spatial_dims)).div_(_expand(span, spatial_dims)).clamp_(0.0, 1.0)
    return out, degenerate, relative_span


FLOAT32_SAFE_SPAN = 0.5
"""Float32 normalisation is used for a map whose ``(max - min) / max|M|`` is at least this: its rounding error
is then below about 1e-6 of the [0, 1] range. Flatter maps (a large offset under a small variation) are
recomputed in float64, where the subtraction does not cancel."""


def upsample_normalize(
    maps: Sequence[torch.Tensor],
    size: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    assume_finite: bool = False,
    max_elements: int = 1 << 24,
    rtol: float = DEGENERATE_RTOL,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``normalize(upsample(m, size))`` for many map tensors at once.

    Float64 maps are processed in float64. Other maps are upsampled and normalised in float32, except those
    whose range is small against their magnitude (``FLOAT32_SAFE_SPAN``), which are redone in float64: the
    result agrees with the float64 computation to about 1e-6 (tested).

    Maps of the same layer resolution are concatenated and go through one upsampling and one normalisation
    (in chunks of at most ``max_elements`` upsampled values), so a sweep over dozens of layers pays the
    per-operation overhead a few times instead of once per layer. Every map is still normalised on its own:
    the results equal the one-tensor-at-a-time computation exactly.

    Volumes: with a 3-element ``size`` ``(D, H, W)`` the maps are volumes ``(..., d, h, w)``, upsampled
    trilinearly (``align_corners=False``, as the 2-D path) and normalised per volume; degenerate flags have the
    leading shape.

    Args:
        maps: Tensors ``(..., h, w)`` (or ``(..., d, h, w)``); the leading shapes and resolutions may differ.
        size: The output ``(H, W)``, or ``(D, H, W)`` for volumes.
        dtype: The dtype of the normalised maps.
        assume_finite: As for :func:`normalize`.
        max_elements: Upsampled values processed at once (bounds the temporaries).
        rtol: As for :func:`normalize`.

    Returns:
        One ``(normalised (..., H, W), degenerate (...))`` pair per input, in input order (``(..., D, H, W)``
        for volumes).

    Example:
        >>> out = upsample_normalize([torch.rand(2, 7, 7), torch.rand(3, 14, 14), torch.ones(1, 7, 7)], (28, 28))
        >>> [tuple(m.shape) for m, _ in out], out[2][1].tolist()
        ([(2, 28, 28), (3, 28, 28), (1, 28, 28)], [True])
        >>> [tuple(m.shape) for m, _ in upsample_normalize([torch.rand(1, 2, 4, 8, 8)], (16, 32, 32))]
        [(1, 2, 16, 32, 32)]
    """
    spatial = len(size)
    for m in maps:
        _check_spatial_dims(m, spatial)
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(maps)
    groups: dict[tuple[tuple[int, ...], torch.device], list[int]] = {}
    for i, m in enumerate(maps):
        groups.setdefault((tuple(int(s) for s in m.shape[-spatial:]), m.device), []).append(i)
    per_map = max(1, math.prod(size))

    def run(chunk: list[int]) -> None:
        flat = [maps[i].reshape(-1, *maps[i].shape[-spatial:]) for i in chunk]
        joined = torch.cat(flat) if len(flat) > 1 else flat[0]
        bad = torch.zeros(joined.shape[:1], dtype=torch.bool, device=joined.device)
        if not assume_finite:
            joined, bad = finite_or_zero(joined, spatial_dims=spatial)
        if joined.dtype == torch.float64 or precise_dtype(joined) == torch.float32:
            normed, degenerate, _ = _min_max(upsample(joined.to(precise_dtype(joined)), size), bad, rtol, spatial)
        else:
            # float32 first (half the memory traffic of float64); maps whose offset is large against their
            # range, where float32 cancellation could show, are redone in float64.
            normed, degenerate, relative_span = _min_max(upsample(joined.float(), size), bad, rtol, spatial)
            redo = (~degenerate & (relative_span < FLOAT32_SAFE_SPAN)).nonzero().flatten()
            if redo.numel():
                precise, _, _ = _min_max(upsample(joined[redo].double(), size), bad[redo], rtol, spatial)
                normed[redo] = precise.to(normed.dtype)
        normed = normed.to(dtype)
        start = 0
        for i, f in zip(chunk, flat, strict=True):
            lead = maps[i].shape[:-spatial]
            stop = start + int(f.shape[0])
            results[i] = (normed[start:stop].reshape(*lead, *size), degenerate[start:stop].reshape(lead))
            start = stop

    for members in groups.values():
        chunk: list[int] = []
        count = 0
        for i in members:
            n = max(1, maps[i].numel() // max(1, math.prod(maps[i].shape[-spatial:]))) * per_map
            if chunk and count + n > max_elements:
                run(chunk)
                chunk, count = [], 0
            chunk.append(i)
            count += n
        if chunk:
            run(chunk)
    done = [r for r in results if r is not None]
    assert len(done) == len(maps)  # every input index belongs to exactly one group
    return done
