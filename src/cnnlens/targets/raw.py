"""Targets on raw model outputs, and targets that pick something on the clean output.

Segmentation and dense regression outputs ``(B, C, H, W)`` (:class:`SegmentationTarget`, :class:`RegionTarget`),
multi-label sigmoid heads (:class:`MultiLabelTarget`, :class:`LabelTarget`) and contrasts between classes
(:class:`ContrastiveTarget`, Finer-CAM's idea). See :mod:`cnnlens.targets` for the protocol they extend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from cnnlens.errors import TargetError
from cnnlens.targets.base import ClassTarget, Score, Target, _check_logits

__all__ = [
    "ContrastiveTarget",
    "LabelTarget",
    "MultiLabelTarget",
    "RegionTarget",
    "SegmentationTarget",
    "expand_targets",
]


# -- targets on raw model outputs, and targets that depend on the clean output -----------------------------
#
# Two optional methods extend the Target protocol (looked up with getattr, so any target may have them):
#
# * ``expand(logits) -> list[Target]``: a target that stands for several targets, known only once the model has
#   run (every label above a threshold; a contrast against each reference class). ``Capture.run`` replaces it
#   by its expansion on the clean output (:func:`expand_targets`), so each becomes one map per sample.
# * ``freeze(logits) -> Target``: a target that picks something on the output it is given (the predicted
#   region of a class, the nearest competing classes). :class:`cnnlens.capture.Probe` freezes it on the clean
#   output, so the extra passes of SmoothGrad, Integrated Gradients or Score-CAM never re-pick on a noisy,
#   interpolated or masked input.
# * ``select(sample_index) -> Target``: the target laid out for rows that derive from samples ``sample_index``
#   (chunked passes and replays take rows of the batch in any order).


def expand_targets(targets: list[Target], logits: torch.Tensor) -> list[Target]:
    """Replace every target that has ``expand(logits)`` by its expansion (others are kept as they are).

    Example:
        >>> [t.name for t in expand_targets([MultiLabelTarget(labels=[2, 0])], torch.zeros(1, 3))]
        ['label 2 (logit)', 'label 0 (logit)']
    """
    if not any(callable(getattr(t, "expand", None)) for t in targets):
        return targets
    out: list[Target] = []
    for target in targets:
        expand = getattr(target, "expand", None)
        out.extend(expand(logits) if callable(expand) else [target])
    return out


def _check_dense(output: torch.Tensor, who: str) -> None:
    if output.ndim != 4:
        raise TargetError(
            f"{who} needs a dense output (batch, channels, H, W), but the model returned shape "
            f"{tuple(output.shape)}; use it with a segmentation or dense-regression model (pass output_selector= "
            "to pick the dense tensor out of a dict)."
        )


def _channel(output: torch.Tensor, channel: int, who: str) -> torch.Tensor:
    if not 0 <= channel < output.shape[1]:
        raise TargetError(
            f"{who}: channel {channel} is out of range for an output with {output.shape[1]} channels "
            f"(valid: 0..{output.shape[1] - 1})."
        )
    return output[:, channel]


def _mask_like(mask: torch.Tensor, plane: torch.Tensor, who: str) -> torch.Tensor:
    """``mask`` ((H, W) or (B, H, W)) broadcast to the (B, H, W) ``plane``, in its dtype."""
    if (
        mask.ndim not in (2, 3)
        or tuple(mask.shape[-2:]) != tuple(plane.shape[-2:])
        or (mask.ndim == 3 and mask.shape[0] not in (1, plane.shape[0]))
    ):
        raise TargetError(
            f"{who}: the mask has shape {tuple(mask.shape)} but the output plane is {tuple(plane.shape)}; give a "
            "mask (H, W) for every sample or (B, H, W), at the output's resolution."
        )
    return mask.to(device=plane.device, dtype=plane.dtype).expand_as(plane)


def _select_mask(mask: torch.Tensor | None, sample_index: torch.Tensor) -> torch.Tensor | None:
    if mask is None or mask.ndim != 3 or mask.shape[0] == 1:
        return mask
    return mask.index_select(0, sample_index.to(mask.device))


@dataclass(frozen=True, eq=False)
class SegmentationTarget:
    """The sum of class ``category``'s logits over a mask, for dense outputs ``(B, K, H, W)``.

    Formula: ``S = sum_ij y[c, i, j] · M_ij``, with ``M`` the given mask ``(H, W)`` or ``(B, H, W)``, or, when
    ``mask`` is None, the pixels predicted as ``c`` on the **clean** output (``argmax_k y[k] == c``; frozen there
    like a class target, so smoothing or integration paths keep the same region). The same score as
    pytorch-grad-cam's ``SemanticSegmentationTarget(category, mask)``.

    Example:
        >>> out = torch.zeros(1, 2, 2, 2); out[0, 1, 0, 0] = 3.0
        >>> SegmentationTarget(1)(out)
        tensor([3.])
    """

    category: int
    mask: torch.Tensor | None = None

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        where = "predicted region" if self.mask is None else "mask"
        return f"segmentation class {self.category} ({where})"

    def region(self, output: torch.Tensor) -> torch.Tensor:
        """The ``(B, H, W)`` weights of the sum: the mask, or where the output predicts the class."""
        _check_dense(output, "SegmentationTarget")
        plane = _channel(output, self.category, "SegmentationTarget")
        if self.mask is None:
            return (output.detach().argmax(dim=1) == self.category).to(plane.dtype)
        return _mask_like(self.mask, plane, "SegmentationTarget")

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """Return the masked sum of the class logits per sample."""
        plane = _channel(output, self.category, "SegmentationTarget") if output.ndim == 4 else output
        return (plane * self.region(output)).sum(dim=(1, 2))

    def class_indices(self, output: torch.Tensor) -> torch.Tensor:
        """The explained class, for every sample."""
        return torch.full((output.shape[0],), self.category, dtype=torch.long, device=output.device)

    def freeze(self, output: torch.Tensor) -> SegmentationTarget:
        """The target with its predicted region fixed on ``output`` (itself when a mask was given)."""
        return self if self.mask is not None else SegmentationTarget(self.category, self.region(output).detach())

    def select(self, sample_index: torch.Tensor) -> SegmentationTarget:
        """The target for rows that derive from samples ``sample_index``."""
        return SegmentationTarget(self.category, _select_mask(self.mask, sample_index))


@dataclass(frozen=True, eq=False)
class RegionTarget:
    """A dense regression target: the mean (or sum) of output channel ``channel`` over a region.

    For pixel-wise regression (depth, heat maps, keypoint maps) on outputs ``(B, C, H, W)``. ``region`` is a
    box ``(top, left, bottom, right)`` in output pixels (half-open: rows ``top..bottom-1``), or a mask
    ``(H, W)``/``(B, H, W)`` (its values weight the pixels). ``reduce="mean"`` divides by the region's weight.

    Example:
        >>> out = torch.arange(8.0).view(1, 2, 2, 2)
        >>> RegionTarget(1, (0, 0, 1, 2))(out), RegionTarget(1, (0, 0, 1, 2), reduce="sum")(out)
        (tensor([4.5000]), tensor([9.]))
    """

    channel: int
    region: tuple[int, int, int, int] | torch.Tensor
    reduce: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "sum"):
            raise TargetError(f"RegionTarget: reduce must be 'mean' or 'sum', got {self.reduce!r}.")
        if not isinstance(self.region, torch.Tensor):
            box = tuple(self.region)
            if len(box) != 4 or not all(isinstance(v, int) for v in box) or box[0] >= box[2] or box[1] >= box[3]:
                raise TargetError(
                    f"RegionTarget: region must be a box (top, left, bottom, right) of ints with top < bottom and "
                    f"left < right, or a mask tensor; got {self.region!r}."
                )

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        where = f"box {tuple(self.region)}" if not isinstance(self.region, torch.Tensor) else "mask"
        return f"{self.reduce} of channel {self.channel} over {where}"

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        """The ``(B, H, W)`` pixel weights of the region."""
        _check_dense(output, "RegionTarget")
        plane = _channel(output, self.channel, "RegionTarget")
        if isinstance(self.region, torch.Tensor):
            return _mask_like(self.region, plane, "RegionTarget")
        top, left, bottom, right = self.region
        height, width = plane.shape[-2:]
        if top < 0 or left < 0 or bottom > height or right > width:
            raise TargetError(
                f"RegionTarget: the box {tuple(self.region)} does not lie inside the output plane of "
                f"{height}x{width} pixels."
            )
        box = torch.zeros(plane.shape[-2:], dtype=plane.dtype, device=plane.device)
        box[top:bottom, left:right] = 1
        return box.expand_as(plane)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """Return the region's mean (or sum) of the channel per sample."""
        weights = self.weights(output)
        total = (_channel(output, self.channel, "RegionTarget") * weights).sum(dim=(1, 2))
        if self.reduce == "sum":
            return total
        area = weights.sum(dim=(1, 2))
        if bool((area == 0).any()):
            raise TargetError("RegionTarget: the region is empty for some sample (its mask sums to 0).")
        return total / area

    def class_indices(self, output: torch.Tensor) -> torch.Tensor:
        """A region target has no class: ``-1`` for every sample."""
        return torch.full((output.shape[0],), -1, dtype=torch.long, device=output.device)

    def select(self, sample_index: torch.Tensor) -> RegionTarget:
        """The target for rows that derive from samples ``sample_index``."""
        if not isinstance(self.region, torch.Tensor):
            return self
        mask = _select_mask(self.region, sample_index)
        assert mask is not None
        return RegionTarget(self.channel, mask, self.reduce)


def _sigmoid_score(logits: torch.Tensor, index: torch.Tensor, score: Score) -> torch.Tensor:
    values = logits.gather(1, index.clamp(min=0).view(-1, 1)).squeeze(1)
    if score == "probability":
        values = torch.sigmoid(values.float())
    elif score == "log_probability":
        values = torch.nn.functional.logsigmoid(values.float())
    elif score != "logit":
        raise TargetError(f"unknown score {score!r}; use 'logit', 'probability' or 'log_probability'.")
    return torch.where(index >= 0, values, torch.zeros_like(values))


@dataclass(frozen=True)
class LabelTarget:
    """One label of a multi-label (sigmoid) head: one label for every sample, or one per sample.

    A per-sample label ``-1`` means "no label" for that sample: its score is 0 and its map is flagged
    degenerate. Scores: the logit (default), ``"probability"`` (the sigmoid, not a softmax) or
    ``"log_probability"`` (log-sigmoid).

    Example:
        >>> LabelTarget((1, -1))(torch.tensor([[0.0, 2.0], [0.0, 5.0]]))
        tensor([2., 0.])
    """

    labels: int | tuple[int, ...]
    score: Score = "logit"

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        return f"label {self.labels} ({self.score})"

    def class_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """The label per sample (``-1`` where a sample has none), checked against the logits."""
        _check_logits(logits, "a label target")
        batch, num_labels = logits.shape
        if isinstance(self.labels, int):
            index = torch.full((batch,), self.labels, dtype=torch.long, device=logits.device)
        else:
            if len(self.labels) != batch:
                raise TargetError(f"got {len(self.labels)} per-sample labels for a batch of {batch}.")
            index = torch.tensor(self.labels, dtype=torch.long, device=logits.device)
        if bool(((index < -1) | (index >= num_labels)).any()):
            raise TargetError(f"label {self.labels} is out of range for a head with {num_labels} labels.")
        return index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the label's score per sample (0 where a sample has no label)."""
        return _sigmoid_score(logits, self.class_indices(logits), self.score)

    def select(self, sample_index: torch.Tensor) -> LabelTarget:
        """The target for rows that derive from samples ``sample_index``."""
        if isinstance(self.labels, int):
            return self
        return LabelTarget(tuple(self.labels[i] for i in sample_index.tolist()), self.score)


@dataclass(frozen=True)
class MultiLabelTarget:
    r"""Every label a sigmoid (multi-label) head predicts: one target per label above ``threshold``.

    On the clean output, the labels of sample ``b`` whose sigmoid probability is ``>= threshold`` are sorted
    by decreasing probability (ties: lower index first). The number of targets ``T`` is the largest number
    of such labels over the batch: target ``t`` explains each sample's ``t``-th label, and a sample with fewer
    labels gets label ``-1`` there (score 0, a zero map flagged degenerate, ``target_classes`` -1). When no
    sample has a label above the threshold, there is one such empty target. With ``labels=[...]`` the given
    labels are explained for every sample instead (``T = len(labels)``), whatever their probability.

    Expanded by the capture on the clean output (see :func:`expand_targets`) into :class:`LabelTarget`\\ s,
    which are fixed: noisy or interpolated inputs never re-pick the labels. Called directly, the target
    returns the sum of the selected labels' scores (one joint score per sample).

    Args:
        threshold: Probability threshold in (0, 1) (0.5 is logit 0).
        score: ``"logit"`` (default), ``"probability"`` (sigmoid) or ``"log_probability"``.
        labels: Explain these labels instead of thresholding.

    Example:
        >>> logits = torch.tensor([[2.0, -1.0, 3.0], [-2.0, 1.0, -3.0]])
        >>> [t.labels for t in MultiLabelTarget().expand(logits)]
        [(2, 1), (0, -1)]
    """

    threshold: float = 0.5
    score: Score = "logit"
    labels: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not (0 < self.threshold < 1)
        ):
            raise TargetError(f"MultiLabelTarget: threshold must be a probability in (0, 1), got {self.threshold!r}.")
        if self.labels is not None and (
            isinstance(self.labels, (str, bytes))
            or not self.labels
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.labels)
        ):
            raise TargetError(f"MultiLabelTarget: labels must be a non-empty list of ints, got {self.labels!r}.")

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        if self.labels is not None:
            return f"labels {list(self.labels)} ({self.score})"
        return f"labels with p >= {self.threshold} ({self.score})"

    def expand(self, logits: torch.Tensor) -> list[Target]:
        """One :class:`LabelTarget` per explained label slot (see the class docstring)."""
        _check_logits(logits, "MultiLabelTarget")
        if self.labels is not None:
            return [LabelTarget(int(v), self.score) for v in self.labels]
        probs = torch.sigmoid(logits.detach().double())
        per_sample: list[list[int]] = []
        for row in probs:
            order = torch.sort(-row, stable=True).indices
            per_sample.append([int(k) for k in order.tolist() if float(row[k]) >= self.threshold])
        slots = max(1, max(len(v) for v in per_sample))
        return [LabelTarget(tuple(v[t] if t < len(v) else -1 for v in per_sample), self.score) for t in range(slots)]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The sum of the selected labels' scores per sample."""
        return torch.stack([t(logits) for t in self.expand(logits)]).sum(dim=0)

    def class_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """Several labels: ``-1`` for every sample (the expanded targets carry one label each)."""
        return torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)


@dataclass(frozen=True)
class ContrastiveTarget:
    """Class ``cls`` against its nearest competing classes (Finer-CAM's idea), usable by every gradient method.

    Paper: Zhang et al., Finer-CAM: Spotting the Difference Reveals Finer Details for Visual Explanation,
    CVPR 2025 (arXiv:2501.11309). Formula: ``S = y_c - (1/k) sum_{r in R} y_r``, where ``R`` holds the ``k``
    classes whose clean logits are nearest to ``y_c`` (smallest ``|y_r - y_c|``, ``r != c``; ties: lower index).
    Explaining the difference suppresses the evidence the similar classes share and keeps what tells ``c``
    apart. With ``reduce="each"`` the target expands into ``k`` targets ``y_c - y_r``, one per reference class.

    The reference classes (and ``c`` when ``cls`` is None, the top class) are picked on the **clean** output
    and frozen (:meth:`freeze`, called by :class:`cnnlens.capture.Probe`): SmoothGrad's noisy copies,
    Integrated Gradients' path and Score-CAM's masked inputs keep them.

    Example:
        >>> logits = torch.tensor([[5.0, 4.0, 0.0, 4.5]])
        >>> t = ContrastiveTarget(0, against=2).freeze(logits)
        >>> t.references, t(logits)
        (((3, 1),), tensor([0.7500]))
    """

    cls: int | tuple[int, ...] | None = None
    against: int = 1
    reduce: Literal["mean", "each"] = "mean"
    references: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.against, bool) or not isinstance(self.against, int) or self.against < 1:
            raise TargetError(f"ContrastiveTarget: against must be an int >= 1, got {self.against!r}.")
        if self.reduce not in ("mean", "each"):
            raise TargetError(f"ContrastiveTarget: reduce must be 'mean' or 'each', got {self.reduce!r}.")

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        what = "top class" if self.cls is None else f"class {self.cls}"
        if self.references is not None and all(len(r) == 1 for r in self.references):
            refs = sorted({r[0] for r in self.references})
            return f"{what} vs {refs[0] if len(refs) == 1 else refs}"
        return f"{what} vs {self.against} nearest"

    def _classes(self, logits: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, "ContrastiveTarget")
        if self.cls is None:
            return logits.detach().argmax(dim=1)
        return ClassTarget(self.cls).class_indices(logits)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The explained class ``(B,)`` and reference classes ``(B, k)`` on ``logits`` (frozen ones if set)."""
        classes = self._classes(logits)
        batch, num_classes = logits.shape
        if self.references is not None:
            if len(self.references) != batch:
                raise TargetError(f"got reference classes for {len(self.references)} samples, the batch has {batch}.")
            return classes, torch.tensor(self.references, dtype=torch.long, device=logits.device)
        if self.against >= num_classes:
            raise TargetError(
                f"ContrastiveTarget: against={self.against} needs more classes than the model's {num_classes}."
            )
        values = logits.detach().double()
        distance = (values - values.gather(1, classes.view(-1, 1))).abs()
        distance.scatter_(1, classes.view(-1, 1), float("inf"))
        order = torch.sort(distance, dim=1, stable=True).indices
        return classes, order[:, : self.against]

    def freeze(self, logits: torch.Tensor) -> ContrastiveTarget:
        """The target with its class and reference classes fixed on ``logits`` (the clean output)."""
        if self.references is not None and isinstance(self.cls, tuple):
            return self
        classes, refs = self.pick(logits)
        return ContrastiveTarget(
            tuple(int(c) for c in classes.tolist()),
            refs.shape[1],
            "mean",
            tuple(tuple(int(v) for v in row) for row in refs.tolist()),
        )

    def expand(self, logits: torch.Tensor) -> list[Target]:
        """``reduce="each"``: one frozen target per reference class; else this target."""
        if self.reduce != "each":
            return [self]
        frozen = self.freeze(logits)
        assert frozen.references is not None
        assert isinstance(frozen.cls, tuple)
        return [
            ContrastiveTarget(frozen.cls, 1, "mean", tuple((row[j],) for row in frozen.references))
            for j in range(len(frozen.references[0]))
        ]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return ``y_c`` minus the mean reference logit, per sample."""
        classes, refs = self.pick(logits)
        return logits.gather(1, classes.view(-1, 1)).squeeze(1) - logits.gather(1, refs).mean(dim=1)

    def class_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """The explained class per sample."""
        return self._classes(logits)

    def select(self, sample_index: torch.Tensor) -> ContrastiveTarget:
        """The frozen target for rows that derive from samples ``sample_index``."""
        if self.references is None or not isinstance(self.cls, tuple):
            raise TargetError("ContrastiveTarget.select needs a frozen target; call freeze(logits) first.")
        rows = sample_index.tolist()
        return ContrastiveTarget(
            tuple(self.cls[i] for i in rows), self.against, "mean", tuple(self.references[i] for i in rows)
        )
