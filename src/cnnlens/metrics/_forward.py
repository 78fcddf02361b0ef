"""Memory-bounded batched forwards for the metrics, on top of :mod:`cnnlens.batching`.

A metric builds its perturbed images lazily, a chunk at a time (``make_batch(start, stop)``), and only the
class scores of each chunk are kept, never its logits or images. Chunk sizes come from the measured footprint
of one forward (remembered per model, input shape, dtype, device and memory format) and the memory budget,
then from the throughput tuner of :mod:`cnnlens.batching`; ``chunk_size`` fixes the size instead. The model
runs inside a layer-less :func:`cnnlens.capture.forward_only` capture (eval mode, inference mode, every
``training`` flag restored).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, Literal

import torch
from torch import nn

from cnnlens.batching import chunk_size as fit_chunk
from cnnlens.batching import measure_peak_bytes, resolve_budget, run_in_chunks, tuner_for
from cnnlens.capture import Capture, MemoryFormat
from cnnlens.errors import TargetError
from cnnlens.metrics._common import MetricError

__all__ = ["ScoreKind", "batched_logits", "batched_scores", "class_scores"]

ScoreKind = Literal["probability", "logit"]
"""What a metric reads from the model: the softmax probability of the class (default) or its logit."""

BatchMaker = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``make_batch(start, stop) -> (images (n, C, H, W), classes (n,))`` for items start..stop-1."""

_FOOTPRINT: weakref.WeakKeyDictionary[Any, dict[Hashable, int]] = weakref.WeakKeyDictionary()


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


def _footprint(cap: Capture, example: torch.Tensor, channels_last: bool) -> int:
    """Measured peak bytes of one forward of ``example`` (1, C, H, W), remembered per model and layout."""
    key = (tuple(example.shape[1:]), example.dtype, str(example.device), channels_last)
    try:
        known = _FOOTPRINT.setdefault(cap.model, {})
    except TypeError:  # a model that cannot be weakly referenced: measure every time
        known = {}
    if key not in known:
        layout: MemoryFormat = "auto" if channels_last else "preserve"
        with torch.inference_mode():
            known[key] = measure_peak_bytes(lambda: cap.forward(example, memory_format=layout), example.device)
    return known[key]


def _run(
    cap: Capture,
    n_items: int,
    make_batch: Callable[[int, int], Any],
    work: Callable[[Any], Any],
    *,
    example: torch.Tensor,
    extra_item_bytes: int,
    batch_budget_mb: float | None,
    chunk_size: int | None,
    channels_last: bool,
    key: Hashable,
) -> list[Any]:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise MetricError(f"chunk_size must be a positive number of images per forward, got {chunk_size!r}.")
    device = example.device
    budget = resolve_budget(batch_budget_mb, device)
    image_bytes = example.nelement() * example.element_size()
    per_item = _footprint(cap, example, channels_last) + 2 * image_bytes + max(0, extra_item_bytes)
    cap_size = fit_chunk(per_item, budget)
    model: nn.Module = cap.model
    tuner = tuner_for(model, ("metrics", key, tuple(example.shape[1:]), example.dtype, str(device), budget), cap_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return run_in_chunks(
        work, n_items, make_batch, max_chunk=min(cap_size, max(1, n_items)), chunk=chunk_size, tuner=tuner, sync=sync
    )


def batched_logits(
    cap: Capture,
    inputs: torch.Tensor,
    *,
    batch_budget_mb: float | None = None,
    chunk_size: int | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits ``(B, K)`` of ``inputs`` run in memory-bounded chunks."""

    def make(start: int, stop: int) -> torch.Tensor:
        return inputs[start:stop]

    def work(x: torch.Tensor) -> torch.Tensor:
        return cap.forward(x, memory_format="auto" if channels_last else "preserve")

    parts = _run(
        cap,
        int(inputs.shape[0]),
        make,
        work,
        example=inputs[:1],
        extra_item_bytes=0,
        batch_budget_mb=batch_budget_mb,
        chunk_size=chunk_size,
        channels_last=channels_last,
        key="logits",
    )
    return torch.cat(parts, dim=0)


def batched_scores(
    cap: Capture,
    n_items: int,
    make_batch: BatchMaker,
    *,
    example: torch.Tensor,
    score: ScoreKind = "probability",
    extra_item_bytes: int = 0,
    batch_budget_mb: float | None = None,
    chunk_size: int | None = None,
    channels_last: bool = False,
    key: Hashable = "scores",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores and top-1 predictions of ``n_items`` perturbed images built lazily by ``make_batch``.

    Args:
        cap: An active capture (usually :func:`cnnlens.capture.forward_only`).
        n_items: How many images.
        make_batch: ``make_batch(start, stop) -> (images, classes)``.
        example: One ``(1, C, H, W)`` image shaped like the items (for the footprint measurement).
        score: ``"probability"`` (softmax, float64) or ``"logit"``.
        extra_item_bytes: Bytes ``make_batch`` needs per item besides the image (masks, ranks...).
        batch_budget_mb: Memory budget of one chunk in MiB (None: :func:`cnnlens.batching.resolve_budget`).
        chunk_size: A fixed number of images per forward (None: the largest that fits, tuned for throughput).
        channels_last: Run CPU forwards in channels-last memory format where the model takes it (faster; see
            :meth:`cnnlens.capture.Capture.forward`).
        key: Names the work for the throughput tuner.

    Returns:
        ``(scores (n,) float64, top1 (n,) long)``; empty tensors when ``n_items`` is 0.
    """
    device = example.device
    if n_items <= 0:
        return torch.zeros(0, dtype=torch.float64, device=device), torch.zeros(0, dtype=torch.long, device=device)

    def work(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, classes = batch
        logits = cap.forward(x, memory_format="auto" if channels_last else "preserve")
        return class_scores(logits, classes, score), logits.argmax(dim=1)

    parts = _run(
        cap,
        n_items,
        make_batch,
        work,
        example=example,
        extra_item_bytes=extra_item_bytes,
        batch_budget_mb=batch_budget_mb,
        chunk_size=chunk_size,
        channels_last=channels_last,
        key=key,
    )
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
