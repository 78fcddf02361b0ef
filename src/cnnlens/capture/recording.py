"""What a capture records: :class:`Recording`, and the gradient helpers of :meth:`Capture.run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeGuard

import torch

from cnnlens.capture.layout import Layout
from cnnlens.inputs import ModelInputs
from cnnlens.targets import Target

__all__ = ["Recording"]


@dataclass
class Recording:
    """What one captured forward/backward produced.

    Attributes:
        layers: The layer keys in the order requested.
        inputs: The model input ``(B, C, H, W)`` (detached).
        logits: The model's logits ``(B, K)`` (detached).
        activations: Layer key -> output in the map view ``(B, C, h, w)`` (``(B, C, d, h, w)`` for volumes),
            detached, never modified in place later. A layer whose output is channels-last or tokens is mapped
            by its layout (:attr:`layouts`); prefix tokens are left out.
        gradients: Layer key -> ``(T, B, C, h, w)`` gradients of each target's score with respect to the layer's
            output, in the same map view; empty when gradients were not requested.
        input_gradients: ``(T, B, C, H, W)`` gradients of each score with respect to the input, or None.
        scores: ``(B, T)`` the target scores.
        target_classes: ``(B, T)`` the class index each target explains (``-1`` for custom targets).
        target_names: One readable name per target.
        layouts: Layer key -> the :class:`~cnnlens.capture.Layout` of its output (``nchw`` for feature maps);
            layers whose output is not spatial (rank 2) have none.
        prefix_tokens: Token layers with prefix tokens only: layer key -> their raw prefix rows ``(B, P, C)``
            (class, distillation, register tokens), detached.
        model_inputs: Every model input (:class:`~cnnlens.inputs.ModelInputs`, detached) when the model was called
            with several inputs or extra arguments; None for a lone tensor (``inputs`` is then all of it).
            ``inputs`` is always the first explained input.
        input_gradients_by_input: With several inputs: input name -> ``(T, B, ...)`` gradients of each score with
            respect to that input (every floating-point explained input); ``input_gradients`` is the first
            input's. Empty for a lone tensor.
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
    layouts: dict[str, Layout] = field(default_factory=dict)
    prefix_tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    model_inputs: ModelInputs | None = None
    input_gradients_by_input: dict[str, torch.Tensor] = field(default_factory=dict)

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
