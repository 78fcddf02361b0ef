"""Similarity of two saliency maps: Spearman rank correlation (average ranks) and SSIM, in torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlens.metrics._common import MetricError

__all__ = ["Correlation", "gaussian_window", "rankdata", "spearman", "ssim"]


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties share the mean of their positions) along the last dimension, float64.

    The same as ``scipy.stats.rankdata(method="average")`` per row.

    Example:
        >>> rankdata(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist()
        [[3.5, 1.0, 3.5, 2.0]]
    """
    lead = values.shape[:-1]
    x = values.reshape(-1, values.shape[-1])
    rows, n = int(x.shape[0]), int(x.shape[1])
    sorted_values, order = torch.sort(x, dim=1, stable=True)
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1 + torch.arange(rows, device=x.device)[:, None] * n
    positions = torch.arange(n, dtype=torch.float64, device=x.device).expand(rows, n)
    sums = torch.zeros(rows * n, dtype=torch.float64, device=x.device).index_add_(
        0, group.flatten(), positions.flatten()
    )
    counts = torch.zeros(rows * n, dtype=torch.float64, device=x.device).index_add_(
        0, group.flatten(), torch.ones(rows * n, dtype=torch.float64, device=x.device)
    )
    average = (sums / counts.clamp(min=1.0))[group] + 1.0
    ranks = torch.empty_like(average)
    ranks.scatter_(1, order, average)
    return ranks.reshape(*lead, n)


@dataclass(frozen=True)
class Correlation:
    """Correlations per pair of maps, and where they are undefined.

    Attributes:
        value: ``(...,)`` float64 correlation in [−1, 1]; 0 where undefined.
        undefined: ``(...,)`` bool: one of the two maps is constant (no ranking), so the value is set to 0.
    """

    value: torch.Tensor
    undefined: torch.Tensor


def _pearson(a: torch.Tensor, b: torch.Tensor) -> Correlation:
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    va, vb = (a * a).sum(dim=-1), (b * b).sum(dim=-1)
    undefined = (va <= 0) | (vb <= 0)
    denom = torch.sqrt(torch.where(undefined, torch.ones_like(va), va * vb))
    value = torch.where(undefined, torch.zeros_like(va), (a * b).sum(dim=-1) / denom)
    return Correlation(value.clamp(-1.0, 1.0), undefined)


def spearman(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = False) -> Correlation:
    """Spearman rank correlation of maps ``a`` and ``b`` ``(..., H, W)``, per map.

    Formula: Pearson correlation of the average ranks (:func:`rankdata`) of the flattened maps; with
    ``absolute=True`` the ranks of ``|a|`` and ``|b|`` (Adebayo et al. report both). A constant map has no
    ranking: the value is 0 and ``undefined`` is set (never NaN).

    Example:
        >>> spearman(torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[10.0, 20.0, 25.0]]])).value.tolist()
        [1.0]
    """
    if a.shape != b.shape:
        raise MetricError(f"cannot correlate maps of shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    fa, fb = a.double().flatten(-2), b.double().flatten(-2)
    if absolute:
        fa, fb = fa.abs(), fb.abs()
    return _pearson(rankdata(fa), rankdata(fb))


def gaussian_window(size: int = 11, sigma: float = 1.5, *, device: torch.device | None = None) -> torch.Tensor:
    """The normalised 1-D Gaussian ``exp(−t²/2σ²)``, ``t = −size//2 … size//2``, float64."""
    t = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity of maps ``a`` and ``b`` ``(..., H, W)``, per map, float64.

    Paper: Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
    Similarity", IEEE TIP 2004 (the Gaussian-window form).

    Formula: with Gaussian-weighted local means ``μ``, variances ``σ²`` and covariance ``σ_ab`` (11 × 11
    window, σ = 1.5, population statistics), ``C1 = (k1·L)²``, ``C2 = (k2·L)²``::

        SSIM = mean over valid windows of (2 μ_a μ_b + C1)(2 σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2))

    Only windows that lie inside the map are averaged. This equals
    ``skimage.metrics.structural_similarity(a, b, data_range=L, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` (which filters with reflection, then crops the border of half a window).

    Example:
        >>> m = torch.rand(2, 16, 16, dtype=torch.float64)
        >>> ssim(m, m).tolist()
        [1.0, 1.0]
    """
    if a.shape != b.shape:
        raise MetricError(f"cannot compare maps of shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if window < 1 or window % 2 == 0:
        raise MetricError(f"the SSIM window must be a positive odd size, got {window}.")
    height, width = int(a.shape[-2]), int(a.shape[-1])
    if height < window or width < window:
        raise MetricError(f"SSIM needs maps of at least {window} × {window} pixels; got {height} × {width}.")
    lead = a.shape[:-2]
    x = a.double().reshape(-1, 1, height, width)
    y = b.double().reshape(-1, 1, height, width)
    g = gaussian_window(window, sigma, device=x.device)
    kernel = torch.outer(g, g)[None, None]

    def filt(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, kernel)

    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).reshape(lead)
