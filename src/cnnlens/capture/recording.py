"""What a capture records: :class:`Recording`, and the gradient helpers of :meth:`Capture.run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeGuard

import torch

from cnnlens.targets import Target

__all__ = ["Recording"]


@dataclass
class Recording:
    """What one captured forward/backward produced.

    Attributes:
        layers: The layer keys in the order requested.
        inputs: The model input ``(B, C, H, W)`` (detached).
        logits: The model's logits ``(B, K)`` (detached).
        activations: Layer key -> output ``(B, C, h, w)``, detached, never modified in place later.
        gradients: Layer key -> ``(T, B, C, h, w)`` gradients of each target's score; empty when
            gradients were not requested.
        input_gradients: ``(T, B, C, H, W)`` gradients of each score with respect to the input, or None.
        scores: ``(B, T)`` the target scores.
        target_classes: ``(B, T)`` the class index each target explains (``-1`` for custom targets).
        target_names: One readable name per target.
    """

    layers: list[str]
    inputs: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    input_gradients: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    target_classes: torch.Tensor | None = None
    target_names: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    @property
    def num_targets(self) -> int:
        """How many targets were explained per sample."""
        return 0 if self.scores is None else int(self.scores.shape[1])


def _is_target_list(targets: object) -> TypeGuard[list[Target]]:
    return isinstance(targets, list) and bool(targets) and all(isinstance(t, Target) for t in targets)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` along a new dim 0, without copying when there is one tensor (a view then)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _grad(score: torch.Tensor, wrt: list[torch.Tensor], *, retain: bool) -> list[torch.Tensor]:
    """Gradients of ``score.sum()`` with respect to ``wrt``; zeros where the score does not depend on one."""
    if not score.requires_grad:
        return [torch.zeros_like(w) for w in wrt]
    results = torch.autograd.grad(score.sum(), wrt, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(results, wrt, strict=True)]
