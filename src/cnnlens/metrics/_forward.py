"""Memory-bounded batched forwards for the metrics, on top of :mod:`cnnlens.batching`.

A metric builds its perturbed images lazily, a chunk at a time (``make_batch(start, stop)``), and only the
class scores of each chunk are kept, never its logits or images. Chunk sizes come from the measured footprint
of the first one-image forward (real work, kept) and the memory budget of the :class:`cnnlens.Execution`
(:func:`cnnlens.batching.run_measured`); ``Execution.chunk_size`` fixes the size instead. Nothing is
remembered between calls. The model runs inside a layer-less :func:`cnnlens.capture.forward_only` capture
(eval mode, inference mode, every ``training`` flag restored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from cnnlens.batching import run_measured
from cnnlens.capture import Capture
from cnnlens.errors import TargetError
from cnnlens.execution import Execution, as_execution

__all__ = ["ScoreKind", "batched_logits", "batched_scores", "class_scores"]

ScoreKind = Literal["probability", "logit"]
"""What a metric reads from the model: the softmax probability of the class (default) or its logit."""

BatchMaker = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``make_batch(start, stop) -> (images (n, C, H, W), classes (n,))`` for items start..stop-1."""


def class_scores(logits: torch.Tensor, classes: torch.Tensor, score: ScoreKind) -> torch.Tensor:
    """``(n,)`` float64 score of ``classes`` in ``logits`` ``(n, K)``: softmax probability or logit.

    The softmax is taken in float64, so a probability is never NaN and underflows only below ~1e-308.
    """
    if logits.ndim != 2:
        raise TargetError(
            f"metrics need logits of shape (batch, num_classes); the model returned shape {tuple(logits.shape)}. "
            "Pass output_selector= to pick them."
        )
    values = logits.double()
    if score == "probability":
        values = torch.softmax(values, dim=1)
    return values.gather(1, classes.view(-1, 1).to(values.device)).squeeze(1)


def _run(
    n_items: int,
    make_batch: Callable[[int, int], Any],
    work: Callable[[Any], Any],
    *,
    example: torch.Tensor,
    extra_item_bytes: int,
    execution: Execution,
) -> list[Any]:
    image_bytes = example.nelement() * example.element_size()
    return run_measured(
        work,
        n_items,
        make_batch,
        execution=execution,
        device=example.device,
        item_bytes=2 * image_bytes + max(0, extra_item_bytes),
    )


def batched_logits(cap: Capture, inputs: torch.Tensor, *, execution: Execution | None = None) -> torch.Tensor:
    """Logits ``(B, K)`` of ``inputs`` run in memory-bounded chunks (see :func:`batched_scores`)."""
    ex = as_execution(execution)

    def make(start: int, stop: int) -> torch.Tensor:
        return inputs[start:stop]

    def work(x: torch.Tensor) -> torch.Tensor:
        return cap.forward(x, execution=ex)

    parts = _run(int(inputs.shape[0]), make, work, example=inputs[:1], extra_item_bytes=0, execution=ex)
    return torch.cat(parts, dim=0)


def batched_scores(
    cap: Capture,
    n_items: int,
    make_batch: BatchMaker,
    *,
    example: torch.Tensor,
    score: ScoreKind = "probability",
    extra_item_bytes: int = 0,
    execution: Execution | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores and top-1 predictions of ``n_items`` perturbed images built lazily by ``make_batch``.

    Args:
        cap: An active capture (usually :func:`cnnlens.capture.forward_only`).
        n_items: How many images.
        make_batch: ``make_batch(start, stop) -> (images, classes)``.
        example: One ``(1, C, H, W)`` image shaped like the items (its size counts towards the footprint).
        score: ``"probability"`` (softmax, float64) or ``"logit"``.
        extra_item_bytes: Bytes ``make_batch`` needs per item besides the image (masks, ranks...).
        execution: Memory budget, chunk size, memory format (None: the default :class:`cnnlens.Execution`).

    Returns:
        ``(scores (n,) float64, top1 (n,) long)``; empty tensors when ``n_items`` is 0.
    """
    ex = as_execution(execution)
    device = example.device
    if n_items <= 0:
        return torch.zeros(0, dtype=torch.float64, device=device), torch.zeros(0, dtype=torch.long, device=device)

    def work(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, classes = batch
        logits = cap.forward(x, execution=ex)
        return class_scores(logits, classes, score), logits.argmax(dim=1)

    parts = _run(n_items, make_batch, work, example=example, extra_item_bytes=extra_item_bytes, execution=ex)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
