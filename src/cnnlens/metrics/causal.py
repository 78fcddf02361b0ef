"""Deletion and insertion (RISE's causal metrics), batched and memory-bounded.

Both games run through one engine (:func:`_games`), so :func:`deletion_insertion` shares the forward of the
untouched image and fills the same batches with both games' images. Shared options (score, normalisation,
target index, output selector, execution) come in one :class:`~cnnlens.metrics.MetricOptions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cnnlens.metrics._common import (
    ClassSpec,
    MetricError,
    ModelLike,
    Normalization,
    Saliency,
    check_choice,
    check_positive_int,
    need_normalization,
    resolve_classes,
)
from cnnlens.metrics._forward import batched_logits, batched_scores, class_scores
from cnnlens.metrics.options import MetricOptions, Prepared

__all__ = [
    "Baseline",
    "CausalCurve",
    "auc",
    "blur",
    "deletion",
    "deletion_insertion",
    "insertion",
    "rise_blur_kernel",
    "saliency_order",
]

Baseline = Literal["zero", "blur", "black"] | torch.Tensor
"""What deleted pixels become / what inserted pixels are drawn on.

``"zero"``: 0 in model-input space (the dataset mean colour for mean/std-normalised inputs; RISE's deletion
substrate); ``"blur"``: the image blurred with RISE's Gaussian (kernel 11, σ = 5, zero padding, in model-input
space; RISE's insertion canvas); ``"black"``: pixel value 0, i.e. ``-mean/std`` (needs the normalisation); or a
tensor broadcastable to ``(B, C, H, W)`` in model-input space.
"""


def rise_blur_kernel(
    size: int = 11, sigma: float = 5.0, *, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> torch.Tensor:
    """RISE's blur kernel: a centred Dirac in a ``size × size`` array smoothed by ``gaussian_filter(·, sigma)``.

    RISE's ``gkern(klen, nsig)`` smooths the Dirac with ``scipy.ndimage.gaussian_filter`` (mode ``"reflect"``,
    truncated at 4σ), so for σ = 5 and 11 × 11 the Gaussian's tails are folded back into the window: the
    kernel sums to 1 and is not a truncated Gaussian. This reproduces it in torch: the 1-D kernel is
    ``k[i] = Σ_t g(t) · [reflect(i + t) = size // 2]`` over ``t = −r..r``, ``r = int(4σ + 0.5)``, ``g`` the
    normalised Gaussian, and the 2-D kernel is ``k ⊗ k`` (the Dirac is separable).

    Example:
        >>> k = rise_blur_kernel()
        >>> tuple(k.shape), round(float(k.sum()), 12)
        ((11, 11), 1.0)
    """
    size = check_positive_int(size, "blur kernel size") or 1
    if not math.isfinite(sigma) or sigma <= 0:
        raise MetricError(f"the blur sigma must be a positive number, got {sigma!r}.")
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    pos = torch.arange(size, dtype=torch.long)[:, None] + torch.arange(-radius, radius + 1)[None, :]
    period = 2 * size
    m = pos.remainder(period)
    m = torch.where(m >= size, period - 1 - m, m)
    k1 = (g[None, :] * (m == size // 2).double()).sum(dim=1)
    return torch.outer(k1, k1).to(dtype=dtype, device=device)


def blur(inputs: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's blurred canvas: each channel convolved with :func:`rise_blur_kernel`, zero padding ``size // 2``.

    Applied to the model-input tensor, as in RISE (its images are normalised tensors), so borders fade towards
    0 (the mean colour).

    Example:
        >>> blur(torch.ones(1, 3, 16, 16))[0, 0, 8, 8].item() == 1.0
        True
    """
    channels = int(inputs.shape[1])
    kernel = rise_blur_kernel(size, sigma, dtype=torch.float64, device=inputs.device)
    weight = kernel.expand(channels, 1, size, size)
    out = F.conv2d(inputs.double(), weight, padding=size // 2, groups=channels)
    return out.to(inputs.dtype)


def auc(scores: torch.Tensor) -> torch.Tensor:
    """RISE's normalised area under a curve sampled at equal steps: ``(Σa − a₀/2 − a_n/2) / n``.

    The trapezoid rule over ``n + 1`` points on ``[0, 1]``; applied along the last dimension.

    Example:
        >>> auc(torch.tensor([1.0, 0.5, 0.0])).item()
        0.5
    """
    values = scores.double()
    n = values.shape[-1] - 1
    if n < 1:
        return values[..., 0] if values.shape[-1] else torch.zeros(values.shape[:-1], dtype=torch.float64)
    return (values.sum(dim=-1) - values[..., 0] / 2 - values[..., -1] / 2) / n


def saliency_order(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel, most salient first: ``(B, H·W)`` long, 0 = the most salient pixel.

    Ties are broken by raster order (row by row, top-left first): a stable descending sort. RISE uses
    ``np.flip(np.argsort(·))`` (unstable quicksort, then reversed), whose tie order is unspecified; for maps
    without ties the two agree.

    Example:
        >>> saliency_order(torch.tensor([[[0.2, 0.9], [0.9, 0.1]]])).tolist()
        [[2, 0, 1, 3]]
    """
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return rank


@dataclass(frozen=True)
class CausalCurve:
    """A deletion or insertion game: the class score after each step, and its area under the curve.

    Attributes:
        mode: ``"deletion"`` or ``"insertion"``.
        scores: ``(B, n + 1)`` float64 class scores; column ``i`` after ``i · step`` pixels were deleted or
            inserted (column 0 the untouched image or the bare canvas).
        fractions: ``(n + 1,)`` float64 share of the pixels deleted/inserted at each column (for plotting).
        auc: ``(B,)`` float64 RISE AUC of each curve (:func:`auc`).
        target_classes: ``(B,)`` the classes scored.
        step: Pixels per step.
        baseline: The substrate (deletion) or canvas (insertion) used, by name.
        score: ``"probability"`` (softmax) or ``"logit"``.
    """

    mode: str
    scores: torch.Tensor
    fractions: torch.Tensor
    auc: torch.Tensor
    target_classes: torch.Tensor
    step: int
    baseline: str
    score: str

    @property
    def mean_auc(self) -> float:
        """The AUC averaged over images (deletion: lower is better; insertion: higher is better)."""
        return float(self.auc.mean()) if self.auc.numel() else 0.0

    @property
    def mean_curve(self) -> torch.Tensor:
        """``(n + 1,)`` the curve averaged over images."""
        return self.scores.mean(dim=0)

    def summary(self) -> dict[str, float | str | int]:
        """Mean AUC and protocol flags, JSON-serialisable."""
        return {
            "mode": self.mode,
            "auc": self.mean_auc,
            "step": self.step,
            "steps": int(self.scores.shape[1]) - 1,
            "baseline": self.baseline,
            "score": self.score,
            "n": float(self.auc.numel()),
        }


def _substrate(
    baseline: Baseline,
    x: torch.Tensor,
    norm: Normalization | None,
    blur_kernel: int,
    blur_sigma: float,
) -> tuple[torch.Tensor, str]:
    if isinstance(baseline, torch.Tensor):
        try:
            sub = baseline.detach().to(device=x.device, dtype=x.dtype).expand_as(x).clone()
        except RuntimeError as exc:
            raise MetricError(
                f"a baseline tensor must broadcast to the inputs {tuple(x.shape)}; got {tuple(baseline.shape)}."
            ) from exc
        if not bool(torch.isfinite(sub).all()):
            raise MetricError("the baseline tensor holds NaN or inf values.")
        return sub, "tensor"
    check_choice(baseline, ("zero", "blur", "black"), "baseline")
    if baseline == "zero":
        return torch.zeros_like(x), "zero"
    if baseline == "blur":
        return blur(x, blur_kernel, blur_sigma), f"blur(kernel={blur_kernel}, sigma={blur_sigma:g})"
    n = need_normalization(norm, "baseline='black'")
    return n.to_model(torch.zeros_like(x.double())).to(x.dtype), "black"


def _games(
    model: ModelLike,
    inputs: torch.Tensor,
    saliency: Saliency,
    targets: ClassSpec,
    modes: Sequence[tuple[str, Baseline]],
    step: int | None,
    blur: tuple[int, float],
    options: MetricOptions | None,
) -> list[CausalCurve]:
    """Run the games of ``modes`` (``("deletion" | "insertion", baseline)``) in shared batches."""
    p = Prepared.of(model, inputs, saliency, options)
    x, score, ex = p.x, p.options.score, p.options.run
    batch, _, height, width = (int(v) for v in x.shape)
    pixels = height * width
    step_px = width if step is None else check_positive_int(step, "step (pixels per step)")
    assert step_px is not None
    n_steps = (pixels + step_px - 1) // step_px
    rank = saliency_order(p.maps)
    subs = [_substrate(baseline, x, p.norm, *blur) for _, baseline in modes]
    pairs = [(mode, sub) for (mode, _), (sub, _) in zip(modes, subs, strict=True)]
    start_all = torch.stack([x if mode == "deletion" else sub for mode, sub in pairs])  # (J, B, C, H, W)
    finish_all = torch.stack([sub if mode == "deletion" else x for mode, sub in pairs])
    jobs = len(modes)
    # Every (job, image, step) except the steps whose image is the input itself (deletion 0, insertion n).
    j_idx = torch.arange(jobs, device=x.device).repeat_interleave(batch * (n_steps + 1))
    b_idx = torch.arange(batch, device=x.device).repeat_interleave(n_steps + 1).repeat(jobs)
    i_idx = torch.arange(n_steps + 1, device=x.device).repeat(jobs * batch)
    is_deletion = torch.tensor([m == "deletion" for m, _ in modes], device=x.device)
    keep = torch.where(is_deletion[j_idx], i_idx != 0, i_idx != n_steps)
    j_idx, b_idx, i_idx = j_idx[keep], b_idx[keep], i_idx[keep]

    with p.forwards() as cap:
        logits = batched_logits(cap, x, execution=ex)
        classes = resolve_classes(targets, p.explained_classes, logits)
        original = class_scores(logits, classes, score)

        def make_batch(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            j, b, i = j_idx[lo:hi], b_idx[lo:hi], i_idx[lo:hi]
            mask = (rank[b] < (i * step_px)[:, None]).view(-1, 1, height, width)
            return torch.where(mask, finish_all[j, b], start_all[j, b]), classes[b]

        scored, _ = batched_scores(
            cap,
            int(j_idx.numel()),
            make_batch,
            example=x[:1],
            score=score,
            extra_item_bytes=pixels * 16 + 2 * x[0].nelement() * x.element_size(),
            execution=ex,
        )
    table = original[None, :, None].expand(jobs, batch, n_steps + 1).clone()
    table[j_idx, b_idx, i_idx] = scored
    fractions = (torch.arange(n_steps + 1, dtype=torch.float64, device=x.device) * step_px).clamp(max=pixels) / pixels
    return [
        CausalCurve(
            mode=mode,
            scores=table[j],
            fractions=fractions,
            auc=auc(table[j]),
            target_classes=classes,
            step=step_px,
            baseline=subs[j][1],
            score=score,
        )
        for j, (mode, _) in enumerate(modes)
    ]


def deletion(
    model: ModelLike,
    inputs: torch.Tensor,
    saliency: Saliency,
    targets: ClassSpec = None,
    *,
    step: int | None = None,
    baseline: Baseline = "zero",
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    options: MetricOptions | None = None,
) -> CausalCurve:
    """Deletion game: remove the most salient pixels first and watch the class probability fall.

    Paper: Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models",
    BMVC 2018 (arXiv 1806.07421), §4.1; protocol of the reference code ``evaluation.py`` (``CausalMetric``).

    Formula: pixels are ranked by the map (:func:`saliency_order`: stable, ties in raster order). Step
    ``i = 0..n`` (``n = ⌈HW / step⌉``) replaces the ``i · step`` top-ranked pixels (all channels) by the
    baseline and records ``a_i = softmax(f(x_i))_c``; ``AUC = (Σ_i a_i − a_0/2 − a_n/2) / n`` (trapezoid on
    [0, 1]; the last step may be partial, as in RISE). Lower is better.

    Defaults follow RISE: the baseline is 0 in model-input space (the mean colour), the score the softmax
    probability of the class (default: the top class, or the Explanation's), ``step`` the image width (224
    for 224 × 224, i.e. 224 steps). AUCs with other steps or baselines are not comparable (REFERENCE §1.9).
    All perturbed images are built lazily and run in memory-bounded batches of several steps per forward.

    Args:
        model: The network (``nn.Module`` or LoadedModel); its state is restored afterwards.
        inputs: ``(B, C, H, W)`` preprocessed images.
        saliency: ``(B, H, W)`` maps (any real values; only their order matters), or an Explanation.
        targets: The class per image; default: the Explanation's classes, else the top class.
        step: Pixels per step (None: the image width).
        baseline: ``"zero"``, ``"blur"``, ``"black"`` or a tensor (see :data:`Baseline`); ``"black"`` needs
            the normalisation (a LoadedModel, or ``MetricOptions(mean=..., std=...)``).
        blur_kernel: Blur kernel size for ``"blur"``.
        blur_sigma: Blur sigma for ``"blur"``.
        options: Score, normalisation, target index, output selector and execution
            (:class:`~cnnlens.metrics.MetricOptions`; None: the defaults).

    Returns:
        A :class:`CausalCurve` (curves for plotting, per-image AUC, ``mean_auc``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        >>> curve = deletion(net, torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4), step=4)
        >>> tuple(curve.scores.shape), tuple(curve.auc.shape)
        ((2, 5), (2,))
    """
    modes = [("deletion", baseline)]
    return _games(model, inputs, saliency, targets, modes, step, (blur_kernel, blur_sigma), options)[0]


def insertion(
    model: ModelLike,
    inputs: torch.Tensor,
    saliency: Saliency,
    targets: ClassSpec = None,
    *,
    step: int | None = None,
    baseline: Baseline = "blur",
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    options: MetricOptions | None = None,
) -> CausalCurve:
    """Insertion game: draw the most salient pixels first onto a blurred canvas and watch the probability rise.

    Paper: RISE (Petsiuk et al., BMVC 2018), §4.1, as :func:`deletion`.

    Formula: as :func:`deletion`, but step ``i`` starts from the canvas ``baseline`` (default: the image
    blurred with RISE's kernel 11, σ = 5, see :func:`blur`) and copies in the ``i · step`` top-ranked pixels
    of the image; ``AUC = (Σ_i a_i − a_0/2 − a_n/2) / n``. Higher is better. Column ``n`` is the image itself.
    The arguments are those of :func:`deletion`; only the default ``baseline`` differs.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        >>> curve = insertion(net, torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), step=8)
        >>> curve.fractions.tolist()
        [0.0, 0.5, 1.0]
    """
    modes = [("insertion", baseline)]
    return _games(model, inputs, saliency, targets, modes, step, (blur_kernel, blur_sigma), options)[0]


def deletion_insertion(
    model: ModelLike,
    inputs: torch.Tensor,
    saliency: Saliency,
    targets: ClassSpec = None,
    *,
    step: int | None = None,
    deletion_baseline: Baseline = "zero",
    insertion_baseline: Baseline = "blur",
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    options: MetricOptions | None = None,
) -> tuple[CausalCurve, CausalCurve]:
    """Both RISE games in one batched pass: ``(deletion, insertion)``; see :func:`deletion`, :func:`insertion`.

    Paper: Petsiuk, Das & Saenko, RISE, BMVC 2018, §4.1.

    Formula: ``AUC = (Σ_i a_i − a_0/2 − a_n/2) / n`` for each game. The forward of the untouched image is
    shared by both games (deletion step 0 and insertion step n), and the perturbed images of both games fill
    the same memory-bounded batches. The arguments are those of :func:`deletion`, with one baseline per game
    (``deletion_baseline``, default ``"zero"``; ``insertion_baseline``, default ``"blur"``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        >>> d, i = deletion_insertion(net, torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), step=4)
        >>> d.mode, i.mode
        ('deletion', 'insertion')
    """
    modes = [("deletion", deletion_baseline), ("insertion", insertion_baseline)]
    curves = _games(model, inputs, saliency, targets, modes, step, (blur_kernel, blur_sigma), options)
    return curves[0], curves[1]
