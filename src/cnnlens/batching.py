"""Memory-bounded batching of extra forward passes (Score-CAM, Ablation-CAM, faithfulness metrics).

Perturbation methods run hundreds or thousands of forwards per image (one per channel, per mask, per
step). Building all perturbed inputs at once would need gigabytes, and the batch size that runs fastest
depends on the model and the machine. This module holds the one shared answer:

1. **A memory budget** (:func:`resolve_budget`): 512 MiB on CPU and MPS by default, half of the free memory
   on CUDA (between 256 MiB and 4 GiB), overridable per call (methods take ``batch_budget_mb``).
2. **A measured per-item footprint** (:func:`measure_peak_bytes`): the peak of live tensor bytes while the
   work runs on one item. On CUDA this is the allocator's peak; elsewhere a ``TorchDispatchMode`` adds up
   the storages that operators create and subtracts them when they are freed (allocator caches and
   library-internal scratch space are not seen, hence the safety factor of :func:`chunk_size`).
3. **The largest chunk that fits** (:func:`chunk_size`): ``budget // (factor * per_item)``.
4. **A throughput tuner** (:class:`ChunkTuner`): within that cap, the first chunks of a run double in size
   (from ``max(4, cap // 16)``) until one is clearly slower per item than the best (by 10 %) or the cap is
   reached; the largest size within 3 % of the best time per item is then kept for the rest of the run and
   remembered (per model, input shape, dtype, device and budget) for later calls. Tuning chunks do real
   work: nothing is computed twice.
5. **The loop** (:func:`run_in_chunks`): builds each chunk lazily with ``make_batch(start, stop)``, so at
   most one chunk of perturbed inputs exists at a time, and returns the per-chunk results in order.

Results never depend on the chunk size beyond floating-point reassociation inside the model's kernels.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cnnlens.errors import MethodError

__all__ = [
    "DEFAULT_BUDGET_MB",
    "SAFETY_FACTOR",
    "ChunkTuner",
    "chunk_size",
    "default_budget_bytes",
    "measure_peak_bytes",
    "resolve_budget",
    "run_in_chunks",
    "tuner_for",
]

B = TypeVar("B")
R = TypeVar("R")

DEFAULT_BUDGET_MB = 512
"""Default budget for the tensors of one chunk on CPU and MPS, in MiB."""

SAFETY_FACTOR = 1.5
"""Per-item footprints are multiplied by this before dividing the budget (allocator slack, library scratch)."""

_MIB = 1 << 20


def default_budget_bytes(device: torch.device | str | None = None) -> int:
    """The default memory budget for one chunk on ``device``.

    CPU and MPS: :data:`DEFAULT_BUDGET_MB` MiB. CUDA: half of the currently free device memory, clamped to
    [256 MiB, 4 GiB].

    Example:
        >>> default_budget_bytes("cpu") == 512 * 2**20
        True
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(min(max(free // 2, 256 * _MIB), 4096 * _MIB))
    return DEFAULT_BUDGET_MB * _MIB


def resolve_budget(budget_mb: float | None, device: torch.device | str | None = None) -> int:
    """Turn a user's ``batch_budget_mb`` option (None = default) into bytes, validating it.

    Raises:
        MethodError: When the budget is not a positive finite number.

    Example:
        >>> resolve_budget(64) == 64 * 2**20
        True
    """
    if budget_mb is None:
        return default_budget_bytes(device)
    if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)):
        raise MethodError(
            f"batch_budget_mb must be a number of MiB (e.g. 256) or None for the default, got "
            f"{type(budget_mb).__name__} {budget_mb!r}."
        )
    if not math.isfinite(budget_mb) or budget_mb <= 0:
        raise MethodError(f"batch_budget_mb must be a positive number of MiB, got {budget_mb!r}.")
    return max(1, int(budget_mb * _MIB))


def chunk_size(
    per_item_bytes: int,
    budget_bytes: int,
    *,
    n_items: int | None = None,
    fixed_bytes: int = 0,
    factor: float = SAFETY_FACTOR,
) -> int:
    """The largest number of items whose tensors fit in ``budget_bytes``.

    Formula: ``max(1, (budget - fixed) // ceil(factor * per_item))``, capped at ``n_items``. At least one
    item is always allowed, so a tiny budget makes the work slower, never impossible.

    Args:
        per_item_bytes: Measured bytes one item needs (its inputs plus the peak of its intermediates).
        budget_bytes: The budget for one chunk.
        n_items: How many items there are in total (the cap), if known.
        fixed_bytes: Bytes a chunk needs whatever its size.
        factor: Safety factor on the per-item bytes.

    Example:
        >>> chunk_size(10 * 2**20, 512 * 2**20)
        34
        >>> chunk_size(10 * 2**20, 512 * 2**20, n_items=8)
        8
    """
    per = max(1, math.ceil(factor * max(0, per_item_bytes)))
    size = max(1, (budget_bytes - max(0, fixed_bytes)) // per)
    if n_items is not None:
        size = min(size, max(1, n_items))
    return int(size)


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int) -> None:
        count = self._refs.get(ptr, 0) - 1
        if count > 0:
            self._refs[ptr] = count
            return
        self._refs.pop(ptr, None)
        self.live -= self._sizes.pop(ptr, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.is_sparse or tensor.layout != torch.strided or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        if ptr in self._refs:
            self._refs[ptr] += 1
        else:
            self._refs[ptr] = 1
            self._sizes[ptr] = storage.nbytes()
            self.live += self._sizes[ptr]
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, ptr)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


def measure_peak_bytes(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak bytes of the tensors created while ``fn()`` runs (what it returns included).

    On CUDA the allocator's peak is used. Elsewhere a dispatch mode follows every storage an operator
    returns until the last tensor using it is freed; tensors that existed before the call (parameters,
    inputs) are not counted, library-internal scratch space is not seen.

    Example:
        >>> measure_peak_bytes(lambda: torch.ones(1024) * 2) >= 4096
        True
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del result
        return int(max(0, peak))
    mode = _LiveBytes()
    with mode:
        result = fn()
    del result
    return int(mode.peak)


class ChunkTuner:
    """Chooses chunk sizes within a memory cap by measured throughput (see the module docstring).

    The first chunks grow from ``start`` (default ``max(4, max_chunk // 16)``: at most five doublings to the
    cap) by doubling up to ``max_chunk``, and each is timed; growth stops once a size is
    clearly slower per item than the best so far (by more than ``worse``), since the time per item rarely
    improves again beyond that point. The size kept is the largest whose time per item is within ``tie``
    of the best: on a flat curve larger chunks amortise per-call costs (weights read once per call,
    Python overhead). A size fixed once is reused by later runs that share the tuner (see
    :func:`tuner_for`).

    Example:
        >>> tuner = ChunkTuner(max_chunk=20)
        >>> sizes = []
        >>> while tuner.best is None:
        ...     size = tuner.next_size(1000)
        ...     sizes.append(size)
        ...     tuner.report(size, size * {4: 0.3, 8: 0.2, 16: 0.29}[size])
        >>> sizes, tuner.best
        ([4, 8, 16], 8)
    """

    def __init__(self, max_chunk: int, *, start: int | None = None, worse: float = 0.10, tie: float = 0.03) -> None:
        if max_chunk < 1:
            raise MethodError(f"max_chunk must be at least 1, got {max_chunk}.")
        self.max_chunk = int(max_chunk)
        self.worse = float(worse)
        self.tie = float(tie)
        self.best: int | None = None
        self.rates: dict[int, float] = {}
        first = max(4, self.max_chunk // 16) if start is None else start
        self._trial = min(max(1, first), self.max_chunk)
        if self._trial == self.max_chunk:
            self.best = self.max_chunk

    def next_size(self, remaining: int) -> int:
        """The size of the next chunk, given how many items are left."""
        size = self.best if self.best is not None else self._trial
        return max(1, min(size, remaining))

    def report(self, size: int, seconds: float) -> None:
        """Record that a chunk of ``size`` items took ``seconds``; advances the search."""
        if self.best is not None or size != self._trial:
            return  # a fixed tuner, or a short trailing chunk: nothing to learn
        rate = seconds / size
        self.rates[size] = rate
        fastest = min(self.rates.values())
        if rate > fastest * (1.0 + self.worse) or size >= self.max_chunk:
            self.best = max(s for s, r in self.rates.items() if r <= fastest * (1.0 + self.tie))
        else:
            self._trial = min(size * 2, self.max_chunk)


_TUNERS: weakref.WeakKeyDictionary[Any, dict[Hashable, ChunkTuner]] = weakref.WeakKeyDictionary()


def tuner_for(owner: object, key: Hashable, max_chunk: int) -> ChunkTuner:
    """The tuner remembered for ``owner`` (e.g. the model) and ``key``; a new one when none fits.

    ``owner`` is held weakly, so tuners go away with their model. A remembered tuner whose cap differs
    (another budget) is replaced.
    """
    try:
        per_owner = _TUNERS.setdefault(owner, {})
    except TypeError:  # not weak-referenceable: do not remember
        return ChunkTuner(max_chunk)
    tuner = per_owner.get(key)
    if tuner is None or tuner.max_chunk != max_chunk:
        tuner = ChunkTuner(max_chunk)
        per_owner[key] = tuner
    return tuner


def run_in_chunks(
    fn: Callable[[B], R],
    n_items: int,
    make_batch: Callable[[int, int], B],
    *,
    max_chunk: int,
    chunk: int | None = None,
    tuner: ChunkTuner | None = None,
    sync: Callable[[], None] | None = None,
) -> list[R]:
    """Run ``fn(make_batch(start, stop))`` over consecutive ranges that cover ``[0, n_items)``, in order.

    Only one batch exists at a time. The chunk size is ``chunk`` when given, else the ``tuner``'s choice,
    else ``max_chunk``.

    Args:
        fn: The work on one batch (e.g. a forward returning logits).
        n_items: How many items in total.
        make_batch: Builds the batch of items ``start..stop-1``.
        max_chunk: The largest chunk allowed (see :func:`chunk_size`).
        chunk: A fixed chunk size (overrides the tuner, still capped by ``max_chunk``).
        tuner: Picks sizes by throughput (see :class:`ChunkTuner`).
        sync: Called before reading the clock (e.g. ``torch.cuda.synchronize``) when tuning.

    Returns:
        One result per chunk, in order.

    Example:
        >>> out = run_in_chunks(lambda b: sum(b), 10, lambda i, j: list(range(i, j)), max_chunk=4)
        >>> out
        [6, 22, 17]
    """
    if n_items < 0:
        raise MethodError(f"n_items must be non-negative, got {n_items}.")
    if chunk is not None and chunk < 1:
        raise MethodError(f"chunk_size must be a positive number of items, got {chunk}.")
    cap = max(1, int(max_chunk))
    results: list[R] = []
    start = 0
    while start < n_items:
        remaining = n_items - start
        if chunk is not None:
            size = min(chunk, cap, remaining)
        elif tuner is not None:
            size = min(tuner.next_size(remaining), cap)
        else:
            size = min(cap, remaining)
        timing = chunk is None and tuner is not None and tuner.best is None
        began = time.perf_counter() if timing else 0.0
        results.append(fn(make_batch(start, start + size)))
        if timing and tuner is not None:
            if sync is not None:
                sync()
            tuner.report(size, time.perf_counter() - began)
        start += size
    return results
