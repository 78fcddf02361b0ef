"""The options every model-running metric shares: how to score, how the inputs were normalised, how to run.

:func:`~cnnlens.metrics.average_drop`, :func:`~cnnlens.metrics.deletion`, :func:`~cnnlens.metrics.insertion`,
:func:`~cnnlens.metrics.deletion_insertion` and :func:`~cnnlens.metrics.road` take one :class:`MetricOptions`
instead of repeating the same seven keywords; each keeps only its own protocol parameters (steps, baselines,
percentages, noise...) as keywords. How to run (memory budget, chunk size, memory format, threads) is the
:class:`cnnlens.Execution` inside it and never changes a result beyond float rounding of batched kernels.

Example:
    >>> from cnnlens.execution import Execution
    >>> opts = MetricOptions(mean=0.0, std=1.0, execution=Execution(chunk_size=8))
    >>> opts.score, opts.execution.chunk_size
    ('probability', 8)
    >>> MetricOptions(score="prob")
    Traceback (most recent call last):
    ...
    cnnlens.metrics._common.MetricError: score must be one of 'probability', 'logit'; got 'prob'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from cnnlens.capture import Capture, forward_only
from cnnlens.execution import Execution, as_execution
from cnnlens.metrics._common import MeanStd as MeanStd
from cnnlens.metrics._common import (
    MetricError,
    ModelLike,
    Normalization,
    Saliency,
    check_choice,
    module_of,
    prepare_inputs,
    prepare_maps,
    resolve_normalization,
)
from cnnlens.metrics._forward import ScoreKind
from cnnlens.outputs import OutputSelector

__all__ = ["MetricOptions", "Prepared", "as_options"]

_SCORES = ("probability", "logit")


@dataclass(frozen=True)
class MetricOptions:
    """How a metric scores the model and reads the inputs, and how it runs.

    Attributes:
        score: ``"probability"`` (softmax of the class, float64; the papers' default) or ``"logit"``.
        preprocessing: Anything with per-channel ``mean``/``std`` (e.g. ``LoadedModel.spec.preprocessing``);
            needed for pixel-space masking/noise and the ``"black"`` baseline. A LoadedModel brings its own.
        mean: Per-channel mean of the input normalisation (with ``std``; overrides ``preprocessing``).
        std: Per-channel std of the input normalisation (with ``mean``).
        target_index: Which target of a multi-target Explanation the maps and classes come from.
        output_selector: Picks the logits from unusual model outputs.
        execution: How to run the forwards (memory budget, chunk size, memory format, threads); None is
            the default :class:`cnnlens.Execution`.
    """

    score: ScoreKind = "probability"
    preprocessing: MeanStd | None = None
    mean: Sequence[float] | float | None = None
    std: Sequence[float] | float | None = None
    target_index: int = 0
    output_selector: OutputSelector | None = None
    execution: Execution | None = None

    def __post_init__(self) -> None:
        check_choice(self.score, _SCORES, "score")
        if isinstance(self.target_index, bool) or not isinstance(self.target_index, int) or self.target_index < 0:
            raise MetricError(f"target_index must be a non-negative int, got {self.target_index!r}.")
        if (self.mean is None) != (self.std is None):
            raise MetricError("give both mean= and std= (the per-channel input normalisation), or neither.")
        as_execution(self.execution)

    def with_(self, **changes: Any) -> MetricOptions:
        """A copy with some fields changed (validated like the constructor)."""
        return replace(self, **changes)

    @property
    def run(self) -> Execution:
        """The execution to use (the default one when None)."""
        return as_execution(self.execution)


def as_options(options: MetricOptions | None) -> MetricOptions:
    """``options`` itself, or the defaults for None; anything else is a :class:`MetricError`."""
    if options is None:
        return MetricOptions()
    if not isinstance(options, MetricOptions):
        raise MetricError(
            f"options must be a cnnlens.metrics.MetricOptions (e.g. MetricOptions(mean=..., std=...)), got "
            f"{type(options).__name__}."
        )
    return options


@dataclass(frozen=True)
class Prepared:
    """A metric's checked inputs: the module, the normalisation, the images, the maps and their classes."""

    options: MetricOptions
    module: nn.Module
    norm: Normalization | None
    x: torch.Tensor
    maps: torch.Tensor
    explained_classes: torch.Tensor | None

    @classmethod
    def of(cls, model: ModelLike, inputs: torch.Tensor, saliency: Saliency, options: MetricOptions | None) -> Prepared:
        """Validate and prepare ``model``, ``inputs`` and ``saliency`` (see :mod:`cnnlens.metrics._common`)."""
        opts = as_options(options)
        module = module_of(model)
        norm = resolve_normalization(model, preprocessing=opts.preprocessing, mean=opts.mean, std=opts.std)
        x = prepare_inputs(module, inputs)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        maps, classes = prepare_maps(saliency, int(x.shape[0]), size, x.device, target_index=opts.target_index)
        return cls(opts, module, norm, x, maps, classes)

    @contextlib.contextmanager
    def forwards(self) -> Iterator[Capture]:
        """A layer-less capture of the module (eval mode, restored after) with the execution's threads."""
        with (
            self.options.run.threads_applied(),
            forward_only(self.module, output_selector=self.options.output_selector) as cap,
        ):
            yield cap
