"""Class targets: the protocol, class and rank targets, user callables, and how user values are resolved.

A target is a callable from logits ``(B, K)`` to one score per sample ``(B,)``. Users pass an int or a class
name (one class for every sample), a sequence of ints and/or class names (one class per sample), ``None`` (the
top class), a ``(B, T)`` index tensor (T classes per sample) or their own callable; :func:`resolve_targets`
converts these at the edge. Class names match the model's names case-insensitively (:func:`class_index`).
Scores are logits by default: a softmax saturates, and its gradient vanishes for confident predictions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, runtime_checkable

import torch

from cnnlens.errors import TargetError

__all__ = [
    "ClassTarget",
    "FunctionTarget",
    "RankTarget",
    "Score",
    "Target",
    "TargetSpec",
    "class_index",
    "name_targets",
    "resolve_targets",
]

Score = Literal["logit", "probability", "log_probability"]


@runtime_checkable
class Target(Protocol):
    """One score per sample, computed from the logits."""

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        ...

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the scores ``(B,)`` for logits ``(B, K)``."""
        ...

    def class_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the class index per sample ``(B,)``, ``-1`` where the target is not a class."""
        ...


def _score(logits: torch.Tensor, index: torch.Tensor, score: Score) -> torch.Tensor:
    if score == "logit":
        values = logits
    elif score == "probability":
        values = torch.softmax(logits.float(), dim=1)
    elif score == "log_probability":
        values = torch.log_softmax(logits.float(), dim=1)
    else:
        raise TargetError(f"unknown score {score!r}; use 'logit', 'probability' or 'log_probability'.")
    return values.gather(1, index.view(-1, 1)).squeeze(1)


def _check_logits(logits: torch.Tensor, who: str) -> None:
    if logits.ndim != 2:
        raise TargetError(
            f"{who} needs logits of shape (batch, num_classes) but the model returned shape "
            f"{tuple(logits.shape)}; for a dense output (B, K, H, W) use cnnlens.SegmentationTarget(class) or "
            "cnnlens.RegionTarget(channel, box), else pass a callable target that reduces the output to one score "
            "per sample."
        )


@dataclass(frozen=True)
class ClassTarget:
    """The score of a given class: one class for every sample, or one per sample.

    Example:
        >>> ClassTarget(3)(torch.eye(5)[[3, 1]])
        tensor([1., 0.])
    """

    classes: int | tuple[int, ...]
    score: Score = "logit"

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        return f"class {self.classes} ({self.score})"

    def class_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the class index per sample, checked against the logits."""
        _check_logits(logits, "a class target")
        batch, num_classes = logits.shape
        if isinstance(self.classes, int):
            index = torch.full((batch,), self.classes, dtype=torch.long, device=logits.device)
        else:
            if len(self.classes) != batch:
                raise TargetError(
                    f"got {len(self.classes)} per-sample target classes for a batch of {batch}; give one "
                    "class per image, or a single int for all of them."
                )
            index = torch.tensor(self.classes, dtype=torch.long, device=logits.device)
        bad = (index < 0) | (index >= num_classes)
        if bool(bad.any()):
            raise TargetError(
                f"target class {int(index[bad][0])} is out of range for a model with {num_classes} classes "
                f"(valid: 0..{num_classes - 1})."
            )
        return index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the score of the target class for each sample."""
        return _score(logits, self.class_indices(logits), self.score)


@dataclass(frozen=True)
class RankTarget:
    """The class ranked ``rank`` by the model (0 = the top prediction), for each sample.

    Example:
        >>> RankTarget(1)(torch.tensor([[0.0, 3.0, 2.0]]))
        tensor([2.])
    """

    rank: int = 0
    score: Score = "logit"

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        return "top class" if self.rank == 0 else f"class ranked {self.rank + 1}"

    def class_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the index of the class at this rank, per sample."""
        _check_logits(logits, "a ranked target")
        if not 0 <= self.rank < logits.shape[1]:
            raise TargetError(f"rank {self.rank} is out of range for {logits.shape[1]} classes.")
        return torch.topk(logits.detach(), self.rank + 1, dim=1).indices[:, self.rank]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the score of the class at this rank for each sample."""
        return _score(logits, self.class_indices(logits), self.score)


@dataclass(frozen=True)
class FunctionTarget:
    """A user callable ``logits -> (B,)`` scores, validated on every call."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    label: str = "custom"

    @property
    def name(self) -> str:
        """A readable name for manifests."""
        return self.label

    def class_indices(self, logits: torch.Tensor) -> torch.Tensor:
        """A custom target has no class: ``-1`` for every sample."""
        return torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the user's scores after checking their shape."""
        scores = self.fn(logits)
        if not isinstance(scores, torch.Tensor):
            raise TargetError(f"target {self.name!r} returned {type(scores).__name__}; return a tensor (B,).")
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim != 1 or scores.shape[0] != logits.shape[0]:
            raise TargetError(
                f"target {self.name!r} returned shape {tuple(scores.shape)}; it must return one score per "
                f"sample, shape ({logits.shape[0]},)."
            )
        return scores


TargetSpec: TypeAlias = (
    int
    | str
    | Sequence[int | str]
    | torch.Tensor
    | Target
    | Callable[[torch.Tensor], torch.Tensor]
    | Sequence[Target]
    | None
)


def class_index(spec: str | int, class_names: Sequence[str] | None, *, source: str = "target") -> int:
    """Turn a class index or a class name into a class index.

    Names match case-insensitively: an exact name first, then a unique substring (``"tabby"`` finds
    ``"tabby cat"``). A string of digits is an index.

    Args:
        spec: An index, or a class name.
        class_names: The model's class names (``LoadedModel.class_names``), or None when it has none.
        source: How the value was given, for messages (``"target"``, ``"--class"``).

    Returns:
        The class index.

    Raises:
        TargetError: The index is out of range, the name is unknown (close matches are listed) or matches
            several classes, or a name was given for a model without class names.

    Example:
        >>> class_index("Tiger Cat", ["tabby", "tiger cat", "Persian cat"])
        1
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        index = spec
    elif isinstance(spec, str) and spec.strip().lstrip("-").isdigit():
        index = int(spec.strip())
    elif isinstance(spec, str):
        return _name_index(spec.strip(), class_names, source)
    else:
        raise TargetError(f"{source} {spec!r} is a {type(spec).__name__}; give a class index or a class name.")
    if class_names is not None and not 0 <= index < len(class_names):
        raise TargetError(
            f"{source} {index} is out of range: the model has {len(class_names)} classes "
            f"(valid: 0..{len(class_names) - 1})."
        )
    return index


def _name_index(text: str, class_names: Sequence[str] | None, source: str) -> int:
    if class_names is None:
        raise TargetError(
            f"{source} {text!r} is a class name, but this model has no class names; give class indices (ints), "
            "pass class_names=[...] to explain(), or load the model with cnnlens.load_model(..., class_names=FILE)."
        )
    low = text.lower()
    lowered = [n.lower() for n in class_names]
    exact = [i for i, n in enumerate(lowered) if n == low]
    if exact:
        return exact[0]
    partial = [i for i, n in enumerate(lowered) if low and low in n]
    if len(partial) == 1:
        return partial[0]
    if partial:
        shown = ", ".join(f"{i} {class_names[i]!r}" for i in partial[:8])
        more = f" and {len(partial) - 8} more" if len(partial) > 8 else ""
        raise TargetError(f"{source} {text!r} matches several classes: {shown}{more}; give the index or the full name.")
    close = difflib.get_close_matches(low, lowered, n=5, cutoff=0.6)
    hint = (
        " Did you mean " + ", ".join(f"{lowered.index(c)} {class_names[lowered.index(c)]!r}" for c in close) + "?"
        if close
        else " No close match; list the names with model.class_names (or `cnnlens explain IMAGE` for the top-k)."
    )
    raise TargetError(f"no class named {text!r} among the model's {len(class_names)} classes.{hint}")


def name_targets(targets: TargetSpec, class_names: Sequence[str] | None) -> TargetSpec:
    """Replace class names in a target specification by class indices; anything else is returned as is.

    A single name stands for one class for every sample (like an int); a list may mix ints and names (one
    class per sample).

    Raises:
        TargetError: As :func:`class_index`, for each name.

    Example:
        >>> name_targets(["tiger cat", 0], ["tabby", "tiger cat"])
        [1, 0]
    """
    if isinstance(targets, str):
        return class_index(targets, class_names)
    if (
        isinstance(targets, Sequence)
        and not isinstance(targets, (bytes, torch.Tensor))
        and any(isinstance(v, str) for v in targets)
    ):
        indices: list[int | str] = []
        for v in targets:
            if isinstance(v, (str, int)) and not isinstance(v, bool):
                indices.append(class_index(v, class_names))
            else:
                raise TargetError(
                    f"cannot mix class names with {type(v).__name__} in one target list; give class names and "
                    "ints (one per sample), or a list of Target/callables."
                )
        return indices
    return targets


def resolve_targets(
    targets: TargetSpec,
    *,
    top_k: int | None = None,
    score: Score = "logit",
    class_names: Sequence[str] | None = None,
) -> list[Target]:
    """Convert what a user passed into a list of :class:`Target` (one per explained score).

    Args:
        targets: ``None`` (top class), an int or a class name, a sequence of ints and/or class names (one
            per sample), a 1-D index tensor (one per sample), a 2-D ``(B, T)`` index tensor (T targets per
            sample), a :class:`Target`, a callable, or a sequence of targets/callables.
        top_k: Explain the ``top_k`` best classes of each sample (only with ``targets=None``).
        score: Which score class targets use: logits by default.
        class_names: The model's class names, to resolve names in ``targets`` (case-insensitive).

    Returns:
        The list of targets; each produces one explained map per sample.

    Raises:
        TargetError: When the specification is not understood.

    Example:
        >>> [t.name for t in resolve_targets(None, top_k=2)]
        ['top class', 'class ranked 2']
    """
    if top_k is not None:
        if targets is not None:
            raise TargetError("give either targets= or top_k=, not both.")
        if top_k < 1:
            raise TargetError(f"top_k must be at least 1, got {top_k}.")
        return [RankTarget(rank, score) for rank in range(top_k)]
    targets = name_targets(targets, class_names)
    if targets is None:
        return [RankTarget(0, score)]
    if isinstance(targets, bool):
        raise TargetError("a target cannot be a bool; give a class index.")
    if isinstance(targets, int):
        return [ClassTarget(int(targets), score)]
    if isinstance(targets, torch.Tensor):
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TargetError(f"target tensors hold class indices; got dtype {targets.dtype}.")
        if targets.ndim == 0:
            return [ClassTarget(int(targets), score)]
        if targets.ndim == 1:
            return [ClassTarget(tuple(int(v) for v in targets.tolist()), score)]
        if targets.ndim == 2:
            return [ClassTarget(tuple(int(v) for v in col.tolist()), score) for col in targets.T]
        raise TargetError(f"target tensors must be 1-D or 2-D, got shape {tuple(targets.shape)}.")
    if isinstance(targets, Target):
        return [targets]
    if callable(targets):
        return [FunctionTarget(targets, getattr(targets, "__name__", "custom"))]
    if isinstance(targets, Sequence) and not isinstance(targets, (str, bytes)):
        items = list(targets)
        if not items:
            raise TargetError("the target list is empty; pass None for the top class.")
        ints = [v for v in items if isinstance(v, int) and not isinstance(v, bool)]
        if len(ints) == len(items):
            return [ClassTarget(tuple(ints), score)]
        out: list[Target] = []
        for item in items:
            if isinstance(item, Target):
                out.append(item)
            elif callable(item):
                out.append(FunctionTarget(item, getattr(item, "__name__", "custom")))
            else:
                raise TargetError(
                    f"cannot mix {type(item).__name__} with targets; give ints (one class per sample) or "
                    "a list of Target/callables."
                )
        return out
    raise TargetError(
        f"cannot use {type(targets).__name__} as a target; give an int, a list of ints (one per sample), "
        "None for the top class, an index tensor, or a callable logits -> (B,) scores."
    )
