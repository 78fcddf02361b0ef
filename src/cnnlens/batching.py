"""Memory-bounded batching of extra forward passes (Score-CAM, Ablation-CAM, faithfulness metrics).

Perturbation methods run hundreds or thousands of forwards per image (one per channel, per mask, per
step). Building all perturbed inputs at once would need gigabytes. This module holds the one shared answer,
driven by a :class:`cnnlens.Execution` and keeping nothing between calls:

1. **A memory budget** (:func:`resolve_budget`): ``Execution.memory_budget_mb``, else 512 MiB on CPU and MPS
   and, on CUDA, half of the device's *total* memory (between 256 MiB and 4 GiB). With ``tune=True`` the CUDA
   default is half of the currently *free* memory instead (measured, so it depends on what else runs).
2. **A per-item footprint** (:func:`measure_peak_bytes`): the peak of live tensor bytes while the work runs
   on one item. By default a ``TorchDispatchMode`` adds up the storages that operators create and subtracts
   them when they are freed: an exact count that depends only on the model's operators and the shapes, never
   on the machine's load. With ``tune=True`` on CUDA the allocator's peak is used (it also sees library
   workspaces). The one-item run that is measured is real work: its result is kept (:func:`run_measured`),
   so measuring costs no extra forward.
3. **The largest chunk that fits** (:func:`chunk_size`): ``budget // (factor * per_item)``, or
   ``Execution.chunk_size`` when given (still capped by the budget): :func:`plan_chunk`.
4. **The loop** (:func:`run_in_chunks`): builds each chunk lazily with ``make_batch(start, stop)``, so at
   most one chunk of perturbed inputs exists at a time, and returns the per-chunk results in order.

Reproducibility: with ``tune=False`` (the default) chunk boundaries are a pure function of the shapes, the
model's operators, the budget and ``chunk_size``, so the same call gives bitwise identical results on the
same machine whatever its load. Earlier versions timed the first chunks and remembered the fastest size per
model (a process-wide cache): chunk boundaries, and so float rounding inside batched kernels, then depended
on the load of the machine. That cache is gone; nothing here outlives a call.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cnnlens.errors import MethodError
from cnnlens.execution import Execution, as_execution

__all__ = [
    "DEFAULT_BUDGET_MB",
    "SAFETY_FACTOR",
    "chunk_size",
    "default_budget_bytes",
    "measure_peak_bytes",
    "measured_call",
    "plan_chunk",
    "resolve_budget",
    "run_in_chunks",
    "run_measured",
]

B = TypeVar("B")
R = TypeVar("R")

DEFAULT_BUDGET_MB = 512
"""Default budget for the tensors of one chunk on CPU and MPS, in MiB."""

SAFETY_FACTOR = 1.5
"""Per-item footprints are multiplied by this before dividing the budget (allocator slack, library scratch)."""

_MIB = 1 << 20


def default_budget_bytes(device: torch.device | str | None = None, *, tune: bool = False) -> int:
    """The default memory budget for one chunk on ``device``.

    CPU and MPS: :data:`DEFAULT_BUDGET_MB` MiB. CUDA: half of the device's total memory (``tune=False``, a
    constant of the machine) or of its currently free memory (``tune=True``), clamped to [256 MiB, 4 GiB].

    Example:
        >>> default_budget_bytes("cpu") == 512 * 2**20
        True
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(dev)
        return int(min(max((free if tune else total) // 2, 256 * _MIB), 4096 * _MIB))
    return DEFAULT_BUDGET_MB * _MIB


def resolve_budget(budget_mb: float | None, device: torch.device | str | None = None, *, tune: bool = False) -> int:
    """Turn a memory budget in MiB (None = the device default) into bytes, validating it.

    Raises:
        MethodError: When the budget is not a positive finite number.

    Example:
        >>> resolve_budget(64) == 64 * 2**20
        True
    """
    if budget_mb is None:
        return default_budget_bytes(device, tune=tune)
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


def plan_chunk(
    per_item_bytes: int,
    execution: Execution | None,
    device: torch.device | str | None = None,
    *,
    n_items: int | None = None,
    fixed_bytes: int = 0,
) -> int:
    """The chunk size an :class:`~cnnlens.Execution` asks for, given one item's footprint.

    ``execution.chunk_size`` when given, else the largest chunk that fits the budget (:func:`chunk_size`);
    either way capped by the budget and by ``n_items``. A pure function of its arguments (and, for the CUDA
    default budget with ``tune=True``, of the free device memory).

    Example:
        >>> from cnnlens.execution import Execution
        >>> plan_chunk(10 * 2**20, Execution(memory_budget_mb=512))
        34
        >>> plan_chunk(10 * 2**20, Execution(memory_budget_mb=512, chunk_size=8), n_items=5)
        5
    """
    ex = as_execution(execution)
    budget = resolve_budget(ex.memory_budget_mb, device, tune=ex.tune)
    cap = chunk_size(per_item_bytes, budget, n_items=n_items, fixed_bytes=fixed_bytes)
    return cap if ex.chunk_size is None else max(1, min(ex.chunk_size, cap))


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
        # A view of memory that existed before the call (a weight's transpose, a permuted input) allocates
        # nothing: a Keras layer reads its kernel through such views, which were counted as new storages (the
        # whole VGG16 fc1 kernel, 411 MB, per forward) and shrank every chunk to one image.
        before = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)} - set(self._refs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and _storage_ptr(leaf) not in before:
                self._track(leaf)
        return out


def _storage_ptr(tensor: torch.Tensor) -> int:
    """The data pointer of a strided tensor's storage (0 for sparse or meta tensors: never tracked)."""
    if tensor.is_sparse or tensor.layout != torch.strided or tensor.device.type == "meta":
        return 0
    return int(tensor.untyped_storage().data_ptr())


def measured_call(
    fn: Callable[[], R], device: torch.device | str | None = None, *, allocator: bool = False
) -> tuple[R, int]:
    """``fn()`` and the peak bytes of the tensors created while it ran (what it returns included).

    By default a dispatch mode follows every storage an operator returns until the last tensor using it is
    freed: an exact count, the same on every run. Tensors that existed before the call (parameters, inputs)
    are not counted; library-internal scratch space is not seen (hence :data:`SAFETY_FACTOR`). With
    ``allocator=True`` on CUDA the allocator's peak is read instead (it sees cuDNN workspaces, but can
    depend on what else the device holds).

    Example:
        >>> value, peak = measured_call(lambda: torch.ones(1024) * 2)
        >>> peak >= 4096
        True
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if allocator and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        return result, int(max(0, torch.cuda.max_memory_allocated(dev) - base))
    mode = _LiveBytes()
    with mode:
        result = fn()
    return result, int(mode.peak)


def measure_peak_bytes(
    fn: Callable[[], object], device: torch.device | str | None = None, *, allocator: bool = False
) -> int:
    """Peak bytes of the tensors created while ``fn()`` runs (see :func:`measured_call`).

    Example:
        >>> measure_peak_bytes(lambda: torch.ones(1024) * 2) >= 4096
        True
    """
    result, peak = measured_call(fn, device, allocator=allocator)
    del result
    return peak


def run_in_chunks(
    fn: Callable[[B], R],
    n_items: int,
    make_batch: Callable[[int, int], B],
    *,
    max_chunk: int,
    chunk: int | None = None,
    start: int = 0,
) -> list[R]:
    """Run ``fn(make_batch(i, j))`` over consecutive ranges that cover ``[start, n_items)``, in order.

    Only one batch exists at a time. Every chunk has ``min(chunk, max_chunk)`` items (``max_chunk`` when
    ``chunk`` is None), the last one what remains: chunk boundaries are a pure function of the arguments.

    Args:
        fn: The work on one batch (e.g. a forward returning logits).
        n_items: How many items in total.
        make_batch: Builds the batch of items ``i..j-1``.
        max_chunk: The largest chunk allowed (see :func:`chunk_size`).
        chunk: A fixed chunk size (still capped by ``max_chunk``).
        start: The first item (items before it were done elsewhere, e.g. by :func:`run_measured`).

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
    size = max(1, min(int(max_chunk), chunk if chunk is not None else int(max_chunk)))
    results: list[R] = []
    for i in range(max(0, start), n_items, size):
        results.append(fn(make_batch(i, min(i + size, n_items))))
    return results


def run_measured(
    fn: Callable[[B], R],
    n_items: int,
    make_batch: Callable[[int, int], B],
    *,
    execution: Execution | None,
    device: torch.device | str | None = None,
    item_bytes: int = 0,
) -> list[R]:
    """Run ``fn`` over all items in chunks sized from the measured footprint of the first item.

    The first chunk is one item, run under :func:`measured_call` (its result is kept: measuring costs no
    extra work); its peak plus ``item_bytes`` (what ``make_batch`` needs per item) is the per-item footprint
    from which :func:`plan_chunk` sizes the remaining chunks. With ``execution.tune`` on CUDA the allocator's
    peak is measured, else the exact count of created storages (see the module docstring).

    Args:
        fn: The work on one batch.
        n_items: How many items in total.
        make_batch: Builds the batch of items ``i..j-1`` (outside the measurement).
        execution: Budget, chunk size and tuning (None: :data:`cnnlens.execution.DEFAULT`).
        device: Where the work runs (for the budget and the measurement).
        item_bytes: Bytes per item held outside ``fn`` (the batch itself, masks...).

    Returns:
        One result per chunk, in order (an empty list when ``n_items`` is 0).

    Example:
        >>> run_measured(lambda b: sum(b), 5, lambda i, j: list(range(i, j)), execution=None)
        [0, 10]
    """
    ex = as_execution(execution)
    if n_items <= 0:
        return []
    result, peak = measured_call(functools.partial(fn, make_batch(0, 1)), device, allocator=ex.tune)
    size = plan_chunk(peak + max(0, item_bytes), ex, device, n_items=n_items)
    return [result, *run_in_chunks(fn, n_items, make_batch, max_chunk=size, start=1)]
