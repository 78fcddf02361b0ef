"""How to run a computation, kept apart from what it computes.

An :class:`Execution` says how cnnlens runs the forwards and backwards of a call: the memory layout of CPU
forwards, the memory budget and chunk size of batched extra forwards (Score-CAM, Ablation-CAM, metrics,
smoothing), the number of threads, and whether chunk sizes may be tuned by measuring. None of it changes what
a result means, so none of it is part of a method's variant or a run's fingerprint.

Reproducibility: with ``tune=False`` (the default) every chunk size is a pure function of the inputs' shapes,
the budget and ``chunk_size``, so the same call on the same machine gives bitwise identical results whatever
the machine's load. No cache outlives a call: an object that wants to reuse measurements across calls is one
the caller creates and holds.

Example:
    >>> Execution().memory_format
    'contiguous'
    >>> Execution(memory_format="channels_last", memory_budget_mb=512).memory_budget_mb
    512
    >>> Execution(chunk_size=0)
    Traceback (most recent call last):
    ...
    cnnlens.errors.OptionError: Execution.chunk_size must be a positive integer or None, got 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from cnnlens.errors import OptionError

__all__ = ["DEFAULT", "Execution", "MemoryFormat", "as_execution"]

MemoryFormat = Literal["contiguous", "channels_last"]
"""The memory layout of CPU forwards: ``"contiguous"`` (the input's own layout; the accurate default) or
``"channels_last"`` (faster CPU convolutions, measurably less accurate gradients: see docs/benchmarks.md)."""

_FORMATS: tuple[str, ...] = ("contiguous", "channels_last")


def _positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OptionError(f"Execution.{name} must be a positive integer or None, got {value!r}.")


@dataclass(frozen=True)
class Execution:
    """How to run: layout, memory, chunking, threads. Never part of a result's identity.

    Attributes:
        memory_format: Layout of 4-D CPU forwards, ``"contiguous"`` (default, accurate) or ``"channels_last"``
            (1.2-1.6x faster convolutions on CPU; gradients measurably less accurate). Ignored off the CPU.
            A model that cannot run channels-last raises its own error; nothing is retried behind your back.
        memory_budget_mb: Memory budget of one chunk of batched extra forwards in MiB; None chooses the
            device's default (:func:`cnnlens.batching.resolve_budget`).
        chunk_size: Fixed number of samples per chunk of extra forwards; None derives it from the budget.
        threads: ``torch.set_num_threads`` for the duration of the call; None leaves torch's setting.
        tune: Whether chunk sizes may follow the machine's state. Off (default): the first item's footprint is
            an exact count of the storages its operators create and the CUDA default budget comes from the
            device's total memory, so chunk boundaries depend only on shapes, budget and ``chunk_size``. On:
            the CUDA allocator's peak (which sees library workspaces) and half of the *free* device memory
            are used; results are still exact but chunk boundaries (and so float rounding) may differ
            between runs (see :mod:`cnnlens.batching`).
        token_tail: Run the last block of a class-token vision transformer (timm ``VisionTransformer`` with
            ``global_pool="token"``, DeiT distilled, torchvision's ViT) only for the tokens its head reads, when
            every recorded layer lies before that block's attention (:mod:`cnnlens.capture.tokentail`): the same
            logits and gradients up to rounding, ViT-Tiny Grad-CAM about 10% cheaper. False runs the whole block.
    """

    memory_format: MemoryFormat = "contiguous"
    memory_budget_mb: float | None = None
    chunk_size: int | None = None
    threads: int | None = None
    tune: bool = False
    token_tail: bool = True

    def __post_init__(self) -> None:
        if self.memory_format not in _FORMATS:
            raise OptionError(
                f"Execution.memory_format must be one of {', '.join(map(repr, _FORMATS))}, got {self.memory_format!r}."
            )
        budget = self.memory_budget_mb
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0 or budget == float("inf")
        ):
            raise OptionError(
                f"Execution.memory_budget_mb must be a positive finite number of MiB or None, got {budget!r}."
            )
        _positive_int("chunk_size", self.chunk_size)
        _positive_int("threads", self.threads)
        if not isinstance(self.tune, bool):
            raise OptionError(f"Execution.tune must be True or False, got {self.tune!r}.")
        if not isinstance(self.token_tail, bool):
            raise OptionError(f"Execution.token_tail must be True or False, got {self.token_tail!r}.")

    @property
    def channels_last(self) -> bool:
        """Whether CPU forwards run in channels-last layout."""
        return self.memory_format == "channels_last"

    def with_(self, **changes: Any) -> Execution:
        """A copy with some fields changed (validated like the constructor)."""
        return replace(self, **changes)

    @contextlib.contextmanager
    def threads_applied(self) -> Iterator[None]:
        """Set ``torch.set_num_threads(threads)`` for the block when ``threads`` is given, then restore it."""
        if self.threads is None:
            yield
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


DEFAULT = Execution()
"""The default execution: contiguous layout, default budget, derived chunks, torch's threads, no tuning."""


def as_execution(execution: Execution | None) -> Execution:
    """``execution`` itself, or :data:`DEFAULT` for None; anything else is an :class:`OptionError`."""
    if execution is None:
        return DEFAULT
    if not isinstance(execution, Execution):
        raise OptionError(
            f"execution must be a cnnlens.Execution (e.g. Execution(memory_format='channels_last')), "
            f"got {type(execution).__name__}."
        )
    return execution
