"""ROAD: Remove And Debias, with noisy linear imputation (MoRF / LeRF and their combination).

``road`` passes ~80 lines only through its docstring (paper, formula, space, example).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cnnlens.metrics._common import (
    ClassSpec,
    MetricError,
    ModelLike,
    Saliency,
    Space,
    check_choice,
    need_normalization,
    resolve_classes,
)
from cnnlens.metrics._forward import batched_logits, batched_scores, class_scores
from cnnlens.metrics.causal import saliency_order
from cnnlens.metrics.options import MetricOptions, Prepared

__all__ = ["NEIGHBOUR_WEIGHTS", "RoadResult", "noisy_linear_imputation", "removal_count", "road"]

NEIGHBOUR_WEIGHTS: tuple[tuple[int, int, float], ...] = (
    (-1, -1, 1 / 12),
    (-1, 0, 1 / 6),
    (-1, 1, 1 / 12),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (1, 1, 1 / 12),
)
"""``(d_row, d_col, weight)`` of the 8 neighbours in ROAD's imputation: 1/6 for edges, 1/12 for diagonals."""

DEFAULT_PERCENTAGES: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)
_ORDERS = ("morf", "lerf")
_SPACES = ("normalized", "pixel")


def _solve_one(image: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Noise-free linear imputation of one ``(C, H, W)`` image (float64, CPU) where ``removed`` (H, W) is True."""
    import numpy as np
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    channels, height, width = (int(v) for v in image.shape)
    flat_removed = removed.reshape(-1)
    unknown = flat_removed.nonzero().flatten()
    m = int(unknown.numel())
    values = image.reshape(channels, -1)
    if m == 0:
        return image.clone()
    var = torch.full((height * width,), -1, dtype=torch.long)
    var[unknown] = torch.arange(m)
    row, col = unknown // width, unknown % width
    diag = torch.zeros(m, dtype=torch.float64)
    rhs = torch.zeros(m, channels, dtype=torch.float64)
    rows, cols, vals = [], [], []
    for d_row, d_col, weight in NEIGHBOUR_WEIGHTS:
        r, c = row + d_row, col + d_col
        inside = ((r >= 0) & (r < height) & (c >= 0) & (c < width)).nonzero().flatten()
        diag[inside] += weight
        neighbour = r[inside] * width + c[inside]
        is_unknown = flat_removed[neighbour]
        rows.append(inside[is_unknown])
        cols.append(var[neighbour[is_unknown]])
        vals.append(torch.full((int(is_unknown.sum()),), -weight, dtype=torch.float64))
        known = ~is_unknown
        rhs.index_add_(0, inside[known], weight * values[:, neighbour[known]].T)
    diagonal = torch.arange(m)
    a = csc_matrix(
        (
            torch.cat([*vals, diag]).numpy(),
            (torch.cat([*rows, diagonal]).numpy(), torch.cat([*cols, diagonal]).numpy()),
        ),
        shape=(m, m),
    )
    solution = np.asarray(spsolve(a, rhs.numpy())).reshape(m, channels)
    out = values.clone()
    out[:, unknown] = torch.from_numpy(np.ascontiguousarray(solution.T))
    return out.reshape(channels, height, width)


def noisy_linear_imputation(
    images: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise: float | torch.Tensor = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill removed pixels with the weighted mean of their 8 neighbours (one sparse linear system) plus noise.

    Paper: Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods" (ROAD), ICML 2022 (arXiv 2202.00449), §4; reference ``road/imputations.py``
    (``NoisyLinearImputer``).

    Formula: for every removed pixel ``i`` and each channel, ``x_i = Σ_{j∈N(i)} w_j x_j / Σ_{j∈N(i)} w_j``
    over the in-image neighbours ``N(i)`` (weights 1/6 for the 4 edge and 1/12 for the 4 diagonal neighbours;
    the sum is renormalised at image borders exactly as in the reference code), where neighbours that are
    themselves removed are unknowns: all removed pixels are solved jointly as one sparse linear system
    ``A x = b`` (an M-matrix; a direct sparse LU, ``scipy.sparse.linalg.spsolve``, on the CPU in float64: an
    iterative torch solver needs thousands of iterations for large holes, see docs). Then
    ``x_i += ε_i``, ``ε ~ N(0, noise²)`` per pixel and channel. Kept pixels are returned unchanged.

    Because the weights of each equation sum to 1, the imputation commutes with any per-channel affine map:
    imputing the normalised tensor equals normalising the imputed image. Constant images, and linear ramps
    inside holes that do not touch the image border, are reproduced exactly (without noise).

    Args:
        images: ``(B, C, H, W)`` or ``(C, H, W)`` images (any device; solved on the CPU).
        removed: ``(B, H, W)`` or ``(H, W)`` bool, True where a pixel is removed. At least one pixel per image
            must be kept.
        noise: Noise standard deviation: a float, or a ``(C,)`` tensor per channel.
        generator: Source of the noise (a CPU generator; default: torch's global one).

    Returns:
        The imputed images, same shape, dtype and device as ``images``.

    Raises:
        MetricError: Shapes that do not match, or an image with every pixel removed.

    Example:
        >>> img = torch.arange(16.0).view(1, 4, 4)  # a linear ramp
        >>> hole = torch.zeros(4, 4, dtype=torch.bool); hole[1:3, 1:3] = True
        >>> torch.allclose(noisy_linear_imputation(img, hole, noise=0.0), img)
        True
    """
    single = images.ndim == 3
    x = images.unsqueeze(0) if single else images
    mask = removed.unsqueeze(0) if removed.ndim == 2 else removed
    if x.ndim != 4 or mask.ndim != 3 or mask.shape[0] != x.shape[0] or tuple(mask.shape[1:]) != tuple(x.shape[2:]):
        raise MetricError(
            f"imputation needs images (B, C, H, W) and a removal mask (B, H, W) of the same size; got "
            f"{tuple(images.shape)} and {tuple(removed.shape)}."
        )
    mask = mask.detach().to(device="cpu", dtype=torch.bool)
    full = mask.flatten(1).all(dim=1)
    if bool(full.any()):
        raise MetricError("cannot impute an image whose every pixel is removed; keep at least one pixel.")
    channels = int(x.shape[1])
    sigma = torch.as_tensor(noise, dtype=torch.float64).flatten()
    if sigma.numel() == 1:
        sigma = sigma.expand(channels)
    if sigma.numel() != channels or not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise MetricError(f"noise must be a non-negative float or one per channel ({channels}); got {noise!r}.")
    source = x.detach().to(device="cpu", dtype=torch.float64)
    out = []
    for b in range(int(x.shape[0])):
        filled = _solve_one(source[b], mask[b])
        if bool((sigma > 0).any()) and bool(mask[b].any()):
            eps = torch.randn((channels, int(mask[b].sum())), generator=generator, dtype=torch.float64)
            flat = filled.reshape(channels, -1)
            flat[:, mask[b].reshape(-1)] += eps * sigma[:, None]
        out.append(filled)
    result = torch.stack(out).to(device=images.device, dtype=images.dtype)
    return result[0] if single else result


def removal_count(percentage: float, pixels: int) -> int:
    """How many pixels ``percentage`` % of ``pixels`` removes: ``⌊p · HW / 100 + ½⌋``, at most ``HW − 1``.

    Example:
        >>> removal_count(10, 224 * 224), removal_count(99.9, 4)
        (5018, 3)
    """
    return max(0, min(pixels - 1, math.floor(percentage * pixels / 100.0 + 0.5)))


@dataclass(frozen=True)
class RoadResult:
    """ROAD curves per image and their summaries.

    Attributes:
        percentages: The removal percentages ``p`` (P values).
        original: ``(B,)`` float64 class score on the untouched images.
        original_correct: ``(B,)`` bool: the top class is the target class on the untouched images.
        morf: ``(B, P)`` float64 class score after removing the most relevant ``p`` % (None if not run).
        lerf: ``(B, P)`` float64 class score after removing the least relevant ``p`` % (None if not run).
        morf_correct: ``(B, P)`` bool: top class == target class after MoRF removal (None if not run).
        lerf_correct: ``(B, P)`` bool, after LeRF removal (None if not run).
        target_classes: ``(B,)`` the classes scored.
        noise: The imputation noise σ (in ``space``).
        space: Where the noise σ is measured (``"pixel"`` [0, 1] values or ``"normalized"``).
        score: ``"probability"`` or ``"logit"``.
        seed: The noise seed.
    """

    percentages: tuple[float, ...]
    original: torch.Tensor
    original_correct: torch.Tensor
    morf: torch.Tensor | None
    lerf: torch.Tensor | None
    morf_correct: torch.Tensor | None
    lerf_correct: torch.Tensor | None
    target_classes: torch.Tensor
    noise: float
    space: str
    score: str
    seed: int

    @property
    def morf_curve(self) -> torch.Tensor:
        """``(P,)`` mean class score after MoRF removal (lower is better)."""
        return _need(self.morf, "morf").mean(dim=0)

    @property
    def lerf_curve(self) -> torch.Tensor:
        """``(P,)`` mean class score after LeRF removal (higher is better)."""
        return _need(self.lerf, "lerf").mean(dim=0)

    @property
    def morf_accuracy(self) -> torch.Tensor:
        """``(P,)`` share of images still classified as the target after MoRF removal."""
        return _need(self.morf_correct, "morf").double().mean(dim=0)

    @property
    def lerf_accuracy(self) -> torch.Tensor:
        """``(P,)`` share of images still classified as the target after LeRF removal."""
        return _need(self.lerf_correct, "lerf").double().mean(dim=0)

    @property
    def combined(self) -> torch.Tensor:
        """``(B,)`` per image ``mean_p (LeRF(p) − MoRF(p)) / 2`` (higher is better; in [−½, ½] for probabilities)."""
        return ((_need(self.lerf, "lerf") - _need(self.morf, "morf")) / 2).mean(dim=1)

    @property
    def combined_score(self) -> float:
        """The mean of :attr:`combined` over images."""
        return float(self.combined.mean()) if self.original.numel() else 0.0

    def summary(self) -> dict[str, object]:
        """Mean curves, accuracies, the combined score and protocol flags, JSON-serialisable."""
        out: dict[str, object] = {
            "percentages": list(self.percentages),
            "noise": self.noise,
            "space": self.space,
            "score": self.score,
            "seed": self.seed,
            "n": int(self.original.numel()),
        }
        if self.morf is not None:
            out["morf"] = self.morf_curve.tolist()
            out["morf_accuracy"] = self.morf_accuracy.tolist()
        if self.lerf is not None:
            out["lerf"] = self.lerf_curve.tolist()
            out["lerf_accuracy"] = self.lerf_accuracy.tolist()
        if self.morf is not None and self.lerf is not None:
            out["combined"] = self.combined_score
        return out


def _need(value: torch.Tensor | None, order: str) -> torch.Tensor:
    if value is None:
        raise MetricError(f"this ROAD result was computed without {order!r}; run road(..., orders=('morf', 'lerf')).")
    return value


def _check_protocol(
    space: Space, orders: Sequence[str], percentages: Sequence[float], noise: float, seed: int
) -> tuple[list[str], tuple[float, ...]]:
    """Validate ROAD's protocol parameters; the orders and percentages as used."""
    check_choice(space, _SPACES, "space")
    order_list = [check_choice(o, _ORDERS, "each of orders") for o in orders]
    if not order_list or len(set(order_list)) != len(order_list):
        raise MetricError(f"orders must name 'morf' and/or 'lerf' once each, got {list(orders)!r}.")
    pcts = tuple(float(p) for p in percentages)
    if not pcts or not all(math.isfinite(p) and 0.0 <= p < 100.0 for p in pcts):
        raise MetricError(f"percentages must be numbers in [0, 100), got {list(percentages)!r}.")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise MetricError(f"noise must be a non-negative number, got {noise!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MetricError(f"seed must be an int, got {seed!r}.")
    return order_list, pcts


def road(
    model: ModelLike,
    inputs: torch.Tensor,
    saliency: Saliency,
    targets: ClassSpec = None,
    *,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    orders: Sequence[str] = _ORDERS,
    noise: float = 0.01,
    seed: int = 0,
    space: Space = "pixel",
    options: MetricOptions | None = None,
) -> RoadResult:
    """ROAD: remove the most (MoRF) or least (LeRF) relevant p % of pixels, impute them, re-score.

    Paper: Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods", ICML 2022 (arXiv 2202.00449); reference code ``road/road.py``.

    Formula: for each ``p`` the ``k = ⌊p·HW/100 + ½⌋`` top-ranked (MoRF) or bottom-ranked (LeRF) pixels are
    removed (ranking of :func:`~cnnlens.metrics.causal.saliency_order`: stable, ties in raster order) and
    filled by :func:`noisy_linear_imputation`; the class score ``s_p = softmax(f(x̃_p))_c`` and whether the top
    class is still ``c`` are recorded. MoRF: lower is better; LeRF: higher is better;
    ``combined = mean_p (LeRF(p) − MoRF(p)) / 2`` (pytorch-grad-cam's ``ROADCombined``; higher is better).

    Space: the imputation is space-independent (each equation's weights sum to 1, so it commutes with the
    per-channel normalisation); only the noise σ has a unit. ``space="pixel"`` (default, as the authors, who
    impute before normalising) adds ``N(0, noise²)`` on the [0, 1] image, i.e. ``noise / std_c`` on the
    normalised tensor, and needs the normalisation (a LoadedModel, or ``MetricOptions(mean=, std=)``);
    ``space="normalized"`` adds ``N(0, noise²)`` to the model-input tensor (pytorch-grad-cam). The noise of
    each (image, order, p) comes from its own generator seeded from ``seed``, so results do not depend on
    batching. Defaults: ``p ∈ {10, …, 90}``, σ = 0.01, the softmax probability of the class (default: the
    Explanation's, else the top class). The linear systems are solved one (image, order, p) at a time on the
    CPU (:func:`noisy_linear_imputation`), built lazily inside the memory-bounded forward batches.

    Args:
        model: The network (``nn.Module`` or LoadedModel); its state is restored afterwards.
        inputs: ``(B, C, H, W)`` preprocessed images.
        saliency: ``(B, H, W)`` maps (only their order matters), or an Explanation.
        targets: The class per image; default: the Explanation's classes, else the top class.
        percentages: Removal percentages, each in [0, 100).
        orders: Which of ``"morf"``, ``"lerf"`` to run (both for ``combined``).
        noise: Imputation noise σ (in ``space``).
        seed: Noise seed.
        space: ``"pixel"`` or ``"normalized"`` (where σ is measured).
        options: Score, normalisation, target index, output selector and execution
            (:class:`~cnnlens.metrics.MetricOptions`; None: the defaults).

    Returns:
        A :class:`RoadResult`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        >>> r = road(net, torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), percentages=[25, 50], space="normalized")
        >>> tuple(r.morf.shape), -0.5 <= r.combined_score <= 0.5
        ((1, 2), True)
    """
    order_list, pcts = _check_protocol(space, orders, percentages, noise, seed)
    p = Prepared.of(model, inputs, saliency, options)
    x, norm, score, ex = p.x, p.norm, p.options.score, p.options.run
    batch, channels, height, width = (int(v) for v in x.shape)
    pixels = height * width
    if space == "pixel":
        sigma = noise / need_normalization(norm, "ROAD with space='pixel'").std_of(x.double()).flatten().cpu()
    else:
        sigma = torch.full((channels,), float(noise), dtype=torch.float64)
    rank = saliency_order(p.maps)
    counts = [removal_count(p, pixels) for p in pcts]
    n_p, n_o = len(pcts), len(order_list)
    # Items in (image, order, percentage) order; the noise seed uses the canonical order index (morf 0, lerf 1).
    items = [(b, o, k) for b in range(batch) for o in range(n_o) for k in range(n_p)]

    def removed_mask(b: int, order: str, count: int) -> torch.Tensor:
        r = rank[b].view(height, width)
        return r < count if order == "morf" else r >= pixels - count

    with p.forwards() as cap:
        logits = batched_logits(cap, x, execution=ex)
        classes = resolve_classes(targets, p.explained_classes, logits)
        original = class_scores(logits, classes, score)

        def make_batch(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            images, cls = [], []
            for b, o, k in items[lo:hi]:
                order = order_list[o]
                canonical = (b * 2 + _ORDERS.index(order)) * n_p + k
                gen = torch.Generator().manual_seed((seed * 1_000_003 + canonical) % (2**63))
                images.append(
                    noisy_linear_imputation(x[b], removed_mask(b, order, counts[k]), noise=sigma, generator=gen)
                )
                cls.append(classes[b])
            return torch.stack(images), torch.stack(cls)

        scored, top1 = batched_scores(
            cap,
            len(items),
            make_batch,
            example=x[:1],
            score=score,
            extra_item_bytes=pixels * 8 * (channels + 2),
            execution=ex,
        )
    table = scored.view(batch, n_o, n_p)
    correct = (top1 == classes.repeat_interleave(n_o * n_p)).view(batch, n_o, n_p)
    by_order = {order: o for o, order in enumerate(order_list)}
    mo, lo_ = by_order.get("morf"), by_order.get("lerf")
    return RoadResult(
        percentages=pcts,
        original=original,
        original_correct=logits.argmax(dim=1) == classes,
        morf=None if mo is None else table[:, mo],
        lerf=None if lo_ is None else table[:, lo_],
        morf_correct=None if mo is None else correct[:, mo],
        lerf_correct=None if lo_ is None else correct[:, lo_],
        target_classes=classes,
        noise=float(noise),
        space=space,
        score=score,
        seed=seed,
    )
