"""Localisation metrics against ground-truth boxes or masks: pointing game and energy in box."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlens.errors import InputShapeError
from cnnlens.explanation import Explanation
from cnnlens.metrics._common import MetricError, Saliency

__all__ = ["EnergyResult", "PointingResult", "boxes_to_masks", "energy_in_box", "pointing_game"]

BoxSpec = torch.Tensor | Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]]
"""``(B, 4)`` boxes, or ``(B, K, 4)`` / one list of boxes per image (a pixel inside any box counts)."""


def boxes_to_masks(boxes: BoxSpec, size: tuple[int, int], *, device: torch.device | None = None) -> torch.Tensor:
    """Turn boxes ``(x0, y0, x1, y1)`` in input pixels into ``(B, H, W)`` bool masks.

    Convention: pixel ``(row y, column x)`` covers ``[x, x+1) × [y, y+1)`` and lies inside a box when its
    centre does, the box being half-open like the pixels: ``x0 ≤ x + ½ < x1`` and ``y0 ≤ y + ½ < y1``. For
    integer boxes this is exactly the slice ``mask[y0:y1, x0:x1]`` (``x1``/``y1`` exclusive, width
    ``x1 − x0``); boxes that tile the image give each pixel to exactly one box, and a box of zero width or
    height covers nothing. Parts outside the image are ignored.
    Several boxes per image (``(B, K, 4)`` or a list of lists) are united; a list entry may be empty.

    Raises:
        MetricError: A box with ``x1 < x0`` or ``y1 < y0``, non-finite values, or a bad shape.

    Example:
        >>> boxes_to_masks(torch.tensor([[1, 0, 3, 1]]), (2, 4)).int().tolist()
        [[[0, 1, 1, 0], [0, 0, 0, 0]]]
    """
    height, width = size
    if isinstance(boxes, torch.Tensor):
        b = boxes.detach().double()
        if b.ndim == 2:
            b = b[:, None]
        if b.ndim != 3 or b.shape[-1] != 4:
            raise MetricError(f"boxes must be (B, 4) or (B, K, 4) as (x0, y0, x1, y1); got {tuple(boxes.shape)}.")
        per_image = [b[i] for i in range(b.shape[0])]
    elif isinstance(boxes, Sequence) and not isinstance(boxes, (str, bytes)):
        per_image = []
        for entry in boxes:
            t = torch.as_tensor(entry, dtype=torch.float64)
            if t.ndim == 1 and t.numel() == 4:
                t = t[None]
            elif t.numel() == 0:
                t = t.reshape(0, 4)
            if t.ndim != 2 or t.shape[-1] != 4:
                raise MetricError(f"each image's boxes must be (x0, y0, x1, y1) or a list of them; got {entry!r}.")
            per_image.append(t)
    else:
        raise MetricError(f"boxes must be a tensor or a list of boxes per image, got {type(boxes).__name__}.")
    cx = torch.arange(width, dtype=torch.float64) + 0.5
    cy = torch.arange(height, dtype=torch.float64) + 0.5
    masks = torch.zeros(len(per_image), height, width, dtype=torch.bool)
    for i, bxs in enumerate(per_image):
        if bxs.numel() and not bool(torch.isfinite(bxs).all()):
            raise MetricError(f"boxes of image {i} hold NaN or inf values.")
        for x0, y0, x1, y1 in bxs.tolist():
            if x1 < x0 or y1 < y0:
                raise MetricError(f"box {(x0, y0, x1, y1)} of image {i} has x1 < x0 or y1 < y0; give (x0, y0, x1, y1).")
            inside_x = (cx >= x0) & (cx < x1)
            inside_y = (cy >= y0) & (cy < y1)
            masks[i] |= inside_y[:, None] & inside_x[None, :]
    return masks.to(device) if device is not None else masks


def _maps(saliency: Saliency, target_index: int) -> torch.Tensor:
    if isinstance(saliency, Explanation):
        saliency.require_images("localisation metrics (pointing game, energy in box)")
        if not 0 <= target_index < saliency.num_targets:
            raise InputShapeError(f"target_index {target_index} is out of range ({saliency.num_targets} targets).")
        maps = saliency.maps[:, target_index]
    elif isinstance(saliency, torch.Tensor):
        maps = saliency
    else:
        raise InputShapeError(f"saliency must be maps (B, H, W) or an Explanation, got {type(saliency).__name__}.")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise InputShapeError(f"saliency maps must be (B, H, W); got shape {tuple(maps.shape)}.")
    maps = maps.detach().double()
    if not bool(torch.isfinite(maps).all()):
        raise InputShapeError("the saliency maps hold NaN or inf values; pass finite maps.")
    return maps


def _ground_truth(maps: torch.Tensor, boxes: BoxSpec | None, masks: torch.Tensor | None) -> torch.Tensor:
    if (boxes is None) == (masks is None):
        raise MetricError("give exactly one of boxes= (x0, y0, x1, y1 per image) or masks= ((B, H, W) bool).")
    size = (int(maps.shape[-2]), int(maps.shape[-1]))
    if masks is not None:
        gt = masks.detach()
        if gt.ndim == 2:
            gt = gt[None]
        if gt.dtype != torch.bool:
            if gt.is_floating_point() or bool(((gt != 0) & (gt != 1)).any()):
                raise MetricError(f"masks must be bool (or 0/1 integers); got dtype {gt.dtype}.")
            gt = gt.bool()
        gt = gt.to(maps.device)
    else:
        assert boxes is not None
        gt = boxes_to_masks(boxes, size, device=maps.device)
    if gt.ndim != 3 or gt.shape[0] != maps.shape[0] or tuple(gt.shape[-2:]) != size:
        raise MetricError(
            f"the ground truth must have one (H, W) = {size} mask per map ({maps.shape[0]}); got {tuple(gt.shape)}."
        )
    return gt


def _dilate(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Masks grown by every pixel within Euclidean distance ``radius`` (pixel centres)."""
    r = int(radius)
    if r < 1:
        return masks
    offsets = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).to(torch.float32)
    grown = F.conv2d(masks[:, None].float(), disk[None, None].to(masks.device), padding=r)
    return grown[:, 0] > 0.5


@dataclass(frozen=True)
class PointingResult:
    """Pointing game per image and overall.

    Attributes:
        hit: ``(B,)`` bool: a maximum of the map lies in the (dilated) ground truth.
        valid: ``(B,)`` bool: the ground truth is not empty (images with an empty one are left out of the score).
        flat: ``(B,)`` bool: the map is constant (every pixel ties for the maximum); counted as a miss.
        tolerance: The tolerance in pixels.
    """

    hit: torch.Tensor
    valid: torch.Tensor
    flat: torch.Tensor
    tolerance: float

    @property
    def n_valid(self) -> int:
        """How many images count (non-empty ground truth)."""
        return int(self.valid.sum())

    @property
    def accuracy(self) -> float:
        """Hits / valid images, in [0, 1] (0.0 when no image is valid; check :attr:`n_valid`)."""
        n = self.n_valid
        return float((self.hit & self.valid).sum()) / n if n else 0.0


def pointing_game(
    saliency: Saliency,
    *,
    boxes: BoxSpec | None = None,
    masks: torch.Tensor | None = None,
    tolerance: float = 0.0,
    target_index: int = 0,
) -> PointingResult:
    """Pointing game: is the map's maximum inside the object?

    Paper: Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, "Top-down Neural Attention by Excitation Backprop",
    ECCV 2016 / IJCV 2018 (§5.1; 15-pixel tolerance).

    Formula: per image, ``hit = ∃ p ∈ argmax L : dist(p, G) ≤ tolerance`` with ``G`` the ground-truth mask
    (or the union of boxes, see :func:`boxes_to_masks`) and Euclidean distance between pixel centres;
    ``accuracy = Σ hit / N_valid``. Ties: *any* pixel tying for the maximum counts (as Quantus), except a
    constant map (all pixels tie, e.g. a degenerate all-zero map), which is a miss and flagged ``flat``.
    Images with an empty mask are flagged not ``valid`` and left out of the accuracy (never NaN: the accuracy
    is 0.0 when no image is valid).

    Args:
        saliency: ``(B, H, W)`` maps at the resolution of the boxes/masks, or an Explanation.
        boxes: ``(B, 4)`` / ``(B, K, 4)`` ``(x0, y0, x1, y1)`` in input pixels, or a list per image.
        masks: ``(B, H, W)`` bool ground truth (instead of boxes).
        tolerance: Allowed distance in pixels (Zhang et al.: 15).
        target_index: Which target of a multi-target Explanation.

    Returns:
        A :class:`PointingResult`.

    Example:
        >>> m = torch.zeros(1, 8, 8); m[0, 2, 6] = 1.0
        >>> box = [[0, 0, 4, 4]]
        >>> pointing_game(m, boxes=box).accuracy, pointing_game(m, boxes=box, tolerance=3).accuracy
        (0.0, 1.0)
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise MetricError(f"tolerance must be a non-negative number of pixels, got {tolerance!r}.")
    maps = _maps(saliency, target_index)
    gt = _ground_truth(maps, boxes, masks)
    flat_maps = maps.flatten(1)
    top = flat_maps.max(dim=1).values
    peaks = flat_maps == top[:, None]
    flat = peaks.all(dim=1)
    region = _dilate(gt, float(tolerance)).flatten(1)
    hit = (peaks & region).any(dim=1) & ~flat
    valid = gt.flatten(1).any(dim=1)
    return PointingResult(hit=hit & valid, valid=valid, flat=flat, tolerance=float(tolerance))


@dataclass(frozen=True)
class EnergyResult:
    """Energy-based pointing game per image and overall.

    Attributes:
        energy: ``(B,)`` float64 share of the map's mass inside the ground truth, in [0, 1].
        valid: ``(B,)`` bool: non-empty ground truth (others are left out of the mean).
        zero_mass: ``(B,)`` bool: the map sums to 0 (energy reported as 0).
    """

    energy: torch.Tensor
    valid: torch.Tensor
    zero_mass: torch.Tensor

    @property
    def n_valid(self) -> int:
        """How many images count (non-empty ground truth)."""
        return int(self.valid.sum())

    @property
    def mean(self) -> float:
        """Mean energy over valid images (0.0 when none is valid; check :attr:`n_valid`)."""
        n = self.n_valid
        return float(self.energy[self.valid].sum()) / n if n else 0.0


def energy_in_box(
    saliency: Saliency,
    *,
    boxes: BoxSpec | None = None,
    masks: torch.Tensor | None = None,
    target_index: int = 0,
) -> EnergyResult:
    """Energy-based pointing game: the share of the map's mass inside the object.

    Paper: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks",
    CVPR Workshops 2020, §4.3.

    Formula: ``energy = Σ_{p∈G} L(p) / Σ_p L(p)`` per image, with ``G`` the ground-truth mask or the union of
    boxes (:func:`boxes_to_masks`). Maps must be non-negative (use the normalised maps). A map of zero mass
    gets energy 0 and the ``zero_mass`` flag (it still counts, as a failure); an empty ground truth makes the
    image not ``valid`` and it is left out of the mean. Never NaN.

    Args:
        saliency: ``(B, H, W)`` non-negative maps, or an Explanation (its normalised maps).
        boxes: ``(B, 4)`` / ``(B, K, 4)`` ``(x0, y0, x1, y1)`` in input pixels, or a list per image.
        masks: ``(B, H, W)`` bool ground truth (instead of boxes).
        target_index: Which target of a multi-target Explanation.

    Returns:
        An :class:`EnergyResult`.

    Raises:
        MetricError: Negative map values, or a missing/mismatched ground truth.

    Example:
        >>> m = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
        >>> energy_in_box(m, boxes=[[1, 0, 2, 1]]).mean
        0.75
    """
    maps = _maps(saliency, target_index)
    if bool((maps < 0).any()):
        raise MetricError(
            "energy in box needs non-negative maps (a share of mass); pass the normalised maps or relu(map)."
        )
    gt = _ground_truth(maps, boxes, masks)
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * gt).flatten(1).sum(dim=1)
    zero = total <= 0
    energy = torch.where(zero, torch.zeros_like(total), inside / torch.where(zero, torch.ones_like(total), total))
    valid = gt.flatten(1).any(dim=1)
    return EnergyResult(energy=energy.clamp(0.0, 1.0), valid=valid, zero_mass=zero)
