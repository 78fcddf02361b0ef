"""Average Drop %, % Increase in Confidence and Win % (Grad-CAM++'s explanation-map protocol).

``average_drop`` passes ~80 lines only through its docstring (protocol, spaces, example).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnlens.metrics._common import (
    ClassSpec,
    MetricError,
    ModelLike,
    Normalization,
    Saliency,
    Space,
    check_choice,
    need_normalization,
    resolve_classes,
)
from cnnlens.metrics._forward import batched_logits, batched_scores, class_scores
from cnnlens.metrics.options import MetricOptions, Prepared

__all__ = ["AverageDropResult", "WinResult", "average_drop", "explanation_images", "win_percent"]

_SPACES = ("normalized", "pixel")


@dataclass(frozen=True)
class AverageDropResult:
    """Per-image confidences on the image and on its explanation map, and the two summaries.

    Attributes:
        original: ``(B,)`` float64 ``Y``: the class score on the image.
        explained: ``(B,)`` float64 ``O``: the class score on the explanation map ``E``.
        drop: ``(B,)`` float64 ``max(0, Y - O) / Y`` (0 where ``Y == 0``), a fraction in [0, 1].
        increase: ``(B,)`` bool ``O > Y``.
        target_classes: ``(B,)`` the classes scored.
        space: Where the image was multiplied by the map (``"pixel"`` or ``"normalized"``).
        score: ``"probability"`` (softmax) or ``"logit"``.
    """

    original: torch.Tensor
    explained: torch.Tensor
    drop: torch.Tensor
    increase: torch.Tensor
    target_classes: torch.Tensor
    space: str
    score: str

    @property
    def average_drop(self) -> float:
        """Average Drop % = 100/N · Σ max(0, Y − O)/Y (lower is better)."""
        return 100.0 * float(self.drop.mean()) if self.drop.numel() else 0.0

    @property
    def increase_in_confidence(self) -> float:
        """% Increase in Confidence = 100/N · Σ [O > Y] (higher is better)."""
        return 100.0 * float(self.increase.double().mean()) if self.increase.numel() else 0.0

    @property
    def relative_change(self) -> torch.Tensor:
        """``(B,)`` signed ``(Y − O)/Y`` (0 where ``Y == 0``): the drop before clipping at 0."""
        safe = torch.where(self.original > 0, self.original, torch.ones_like(self.original))
        return torch.where(self.original > 0, (self.original - self.explained) / safe, torch.zeros_like(safe))

    def summary(self) -> dict[str, float | str]:
        """The two percentages and the protocol flags, JSON-serialisable."""
        return {
            "average_drop": self.average_drop,
            "increase_in_confidence": self.increase_in_confidence,
            "space": self.space,
            "score": self.score,
            "n": float(self.drop.numel()),
        }


def explanation_images(
    inputs: torch.Tensor, maps: torch.Tensor, space: Space, normalization: Normalization | None
) -> torch.Tensor:
    """The explanation maps ``E = I ∘ L`` as model inputs: ``(B, C, H, W)`` in the inputs' dtype.

    ``"normalized"``: ``E = x · L`` on the model-input tensor (0 becomes the dataset mean colour; the
    pytorch-grad-cam and torch-cam convention). ``"pixel"``: ``E = normalise(p · L)`` with ``p = x · std + mean``
    the ``[0, 1]`` image (0 becomes black; the Grad-CAM++ authors' convention). The product is taken in float64
    and a map of all ones returns the input bit for bit.

    Example:
        >>> x = torch.zeros(1, 3, 2, 2)
        >>> norm = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> explanation_images(x, torch.zeros(1, 2, 2), "pixel", norm).flatten()[:2].tolist()
        [-1.0, -1.0]
    """
    x = inputs.double()
    m = maps.double()[:, None]
    if space == "normalized":
        out = x * m
    else:
        norm = need_normalization(normalization, "space='pixel'")
        out = norm.to_model(norm.to_pixel(x) * m)
    ones = (maps == 1).flatten(1).all(dim=1)
    out = out.to(inputs.dtype)
    return torch.where(ones[:, None, None, None], inputs, out)


def _given_logits(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise MetricError(
            f"logits must be the model's (B, K) logits on the {int(x.shape[0])} inputs, got {shape}; omit logits= "
            "to let the metric run the model."
        )
    if not bool(torch.isfinite(logits).all()):
        raise MetricError("the given logits hold NaN or inf values; omit logits= to let the metric run the model.")
    return logits.detach().to(x.device)


def average_drop(
    model: ModelLike,
    inputs: torch.Tensor,
    saliency: Saliency,
    targets: ClassSpec = None,
    *,
    space: Space = "pixel",
    options: MetricOptions | None = None,
    logits: torch.Tensor | None = None,
) -> AverageDropResult:
    """Average Drop % and % Increase in Confidence of saliency maps (one forward per image and map).

    Paper: Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep
    Convolutional Networks", WACV 2018 (arXiv 1710.11063), §6.1.

    Formula: the explanation map is ``E = I ∘ L`` (the image times the upsampled map ``L`` in [0, 1]);
    ``Y = f_c(I)``, ``O = f_c(E)`` with ``f_c`` the softmax probability of class ``c``::

        Average Drop %             = 100/N · Σ_i max(0, Y_i − O_i) / Y_i        (lower is better)
        % Increase in Confidence   = 100/N · Σ_i [O_i > Y_i]                    (higher is better)

    The per-image terms are returned too. ``Y_i == 0`` (a probability that underflowed) gives a drop of 0.
    A map of all ones leaves the image unchanged, so ``O = Y`` exactly (its forward is skipped): drop 0,
    no increase.

    Masking space (see REFERENCE §1.1/§1.9): ``space="pixel"`` (default, the authors' original: the
    ``[0, 1]`` image is multiplied, so a map value of 0 gives black, and the result is normalised again)
    needs the input normalisation: a :class:`~cnnlens.models.LoadedModel`, or ``MetricOptions(preprocessing=)``
    (an object with ``mean``/``std``) or ``MetricOptions(mean=, std=)``. ``space="normalized"`` multiplies
    the model-input tensor (0 gives the dataset mean colour), as pytorch-grad-cam and torch-cam do; their
    numbers are only comparable in that space.

    Args:
        model: The network (``nn.Module`` or LoadedModel); its state is restored afterwards.
        inputs: ``(B, C, H, W)`` preprocessed images (model-input space).
        saliency: ``(B, H, W)`` maps in [0, 1] (upsampled bilinearly if smaller), or an Explanation.
        targets: The class per image; default: the Explanation's classes, else the top class.
        space: ``"pixel"`` or ``"normalized"`` (above).
        options: Score (``"probability"``, the paper, or ``"logit"``), normalisation, target index, output
            selector and execution (:class:`~cnnlens.metrics.MetricOptions`; None: the defaults).
        logits: ``(B, K)`` the model's logits on ``inputs`` when the caller already has them (a dataset run
            does): ``Y`` is read from them instead of running the model on the images again.

    Returns:
        An :class:`AverageDropResult` (``.average_drop``, ``.increase_in_confidence``, per-image tensors).

    Raises:
        MetricError: Maps outside [0, 1], pixel space without normalisation, unknown options, ``logits`` of
            the wrong shape or with NaN/inf values.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x = torch.rand(2, 3, 2, 2)
        >>> r = average_drop(net, x, torch.ones(2, 2, 2), options=MetricOptions(mean=0.0, std=1.0))
        >>> r.average_drop, r.increase_in_confidence
        (0.0, 0.0)
    """
    check_choice(space, _SPACES, "space")
    p = Prepared.of(model, inputs, saliency, options)
    x, maps, norm, score, ex = p.x, p.maps, p.norm, p.options.score, p.options.run
    if space == "pixel":
        need_normalization(norm, "Average Drop with space='pixel'")
    if float(maps.min()) < 0.0 or float(maps.max()) > 1.0:
        raise MetricError(
            f"Average Drop multiplies the image by a map in [0, 1]; these maps range over [{float(maps.min()):.4g}, "
            f"{float(maps.max()):.4g}]. Pass normalised maps (Explanation.maps or cnnlens.maps.normalize)."
        )
    unchanged = (maps == 1).flatten(1).all(dim=1)
    if logits is not None:
        logits = _given_logits(logits, x)
    with p.forwards() as cap:
        if logits is None:
            logits = batched_logits(cap, x, execution=ex)
        classes = resolve_classes(targets, p.explained_classes, logits)
        original = class_scores(logits, classes, score)
        todo = (~unchanged).nonzero().flatten()

        def make_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = todo[start:stop]
            return explanation_images(x[idx], maps[idx], space, norm), classes[idx]

        scored, _ = batched_scores(
            cap,
            int(todo.numel()),
            make_batch,
            example=x[:1],
            score=score,
            extra_item_bytes=8 * x[0].nelement(),
            execution=ex,
        )
    explained = original.clone()
    explained[todo] = scored
    safe = torch.where(original > 0, original, torch.ones_like(original))
    drop = torch.where(original > 0, (original - explained).clamp(min=0.0) / safe, torch.zeros_like(original))
    return AverageDropResult(
        original=original,
        explained=explained,
        drop=drop,
        increase=explained > original,
        target_classes=classes,
        space=space,
        score=score,
    )


@dataclass(frozen=True)
class WinResult:
    """Win % of method A over method B on the same images.

    Attributes:
        wins: ``(B,)`` float64: 1 where A wins, 0 where B wins, 0.5 for a tie.
        ties: How many images tied.
        clip: Whether the clipped drop ``max(0, Y − O)/Y`` was compared (else the signed ``(Y − O)/Y``).
    """

    wins: torch.Tensor
    ties: int
    clip: bool

    @property
    def win_percent(self) -> float:
        """A's Win % = 100/N · Σ wins (ties count half, so A's and B's Win % add up to 100)."""
        return 100.0 * float(self.wins.mean()) if self.wins.numel() else 0.0

    @property
    def loss_percent(self) -> float:
        """B's Win % over A (``100 − win_percent``)."""
        return 100.0 - self.win_percent if self.wins.numel() else 0.0


def win_percent(a: AverageDropResult, b: AverageDropResult, *, clip: bool = False) -> WinResult:
    """Win % of method A against method B: the share of images where A's confidence drop is smaller.

    Paper: Chattopadhay et al., Grad-CAM++, WACV 2018, §6.1 ("Win %", compared with Grad-CAM).

    Formula: with ``d_i = (Y_i − O_i)/Y_i`` per image (the relative drop in confidence on the explanation
    map), ``Win %(A over B) = 100/N · Σ_i ([d_i^A < d_i^B] + ½ [d_i^A = d_i^B])``. By default the drop is
    signed, so when both maps *raise* the confidence the larger rise wins; ``clip=True`` compares the clipped
    Average-Drop terms ``max(0, d_i)`` instead, which makes every pair of rises a tie. Ties (exactly equal
    drops) count half for each method, so the two Win % add up to 100, as in the paper's tables.

    Args:
        a: :func:`average_drop` of method A.
        b: :func:`average_drop` of method B on the same images, classes, space and score.
        clip: Compare clipped drops.

    Returns:
        A :class:`WinResult`.

    Raises:
        MetricError: When the two results are not for the same images and classes.

    Example:
        >>> one = lambda o: AverageDropResult(torch.tensor([1.0, 1.0]), torch.tensor(o), torch.zeros(2),
        ...                                  torch.zeros(2, dtype=torch.bool), torch.zeros(2), "pixel", "probability")
        >>> win_percent(one([0.9, 0.5]), one([0.8, 0.5])).win_percent
        75.0
    """
    if a.original.shape != b.original.shape:
        raise MetricError(f"Win % compares the same images: got {a.original.numel()} and {b.original.numel()} results.")
    if not torch.equal(a.target_classes.cpu().long(), b.target_classes.cpu().long()):
        raise MetricError("Win % compares the same classes: the two results scored different target classes.")
    if (a.space, a.score) != (b.space, b.score):
        raise MetricError(f"Win % needs one protocol: got space/score {a.space}/{a.score} and {b.space}/{b.score}.")
    if not torch.allclose(a.original.cpu(), b.original.cpu(), rtol=1e-5, atol=1e-8):
        raise MetricError("Win % compares the same images: the original confidences Y of the two results differ.")
    da = a.relative_change.cpu()
    db = b.relative_change.cpu()
    if clip:
        da, db = da.clamp(min=0.0), db.clamp(min=0.0)
    wins = (da < db).double() + 0.5 * (da == db).double()
    return WinResult(wins=wins, ties=int((da == db).sum()), clip=clip)
