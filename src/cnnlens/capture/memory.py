"""The memory layout of a capture's forwards: the input's own (contiguous) or channels-last on the CPU.

One spelling: :attr:`cnnlens.Execution.memory_format`, ``"contiguous"`` (the default, accurate) or
``"channels_last"`` (an explicit speed option). Nothing is retried and nothing is remembered per model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cnnlens.errors import CnnlensError, OptionError
from cnnlens.execution import Execution

__all__ = ["call_in_layout", "wants_channels_last"]


def wants_channels_last(x: torch.Tensor, execution: Execution) -> bool:
    """Whether ``x`` is fed channels-last: asked for, a 4-D floating-point CPU tensor, not channels-last yet."""
    return (
        execution.channels_last
        and x.ndim == 4
        and x.device.type == "cpu"
        and x.is_floating_point()
        and not x.is_contiguous(memory_format=torch.channels_last)
    )


def call_in_layout(model: nn.Module, x: torch.Tensor, call: Callable[[torch.Tensor], Any], execution: Execution) -> Any:
    """``call(x)``, in channels-last memory format when ``execution`` asks for it (see :func:`wants_channels_last`).

    ``Execution(memory_format="channels_last")`` runs a 4-D floating-point input on the CPU in channels-last
    format: oneDNN's convolutions are 1.2-1.6x faster that way (measured on ResNet-50, VGG16, InceptionV3 and
    EfficientNet-Lite0), but PyTorch/oneDNN's channels-last convolution backward on the CPU is measurably less
    accurate: against a float64 reference, ResNet-50 (weights=None, 224 px) guided backprop 1.1e-4 relative
    error vs 2.6e-7 contiguous, saliency 3.7e-2 vs 2.1e-3, InceptionV3 ``Mixed_6e`` Grad-CAM 2.2e-4 vs 1.9e-6
    (depending on the CPU's kernel set; ``tests/test_accuracy.py``).

    Nothing is retried: a model that cannot run channels-last (typically a ``.view()`` of a feature map) fails
    once, with an :class:`~cnnlens.errors.OptionError` that names the fix and keeps the model's error as
    ``__cause__``. cnnlens' own errors and out-of-memory errors pass through unchanged.

    Raises:
        OptionError: The model raised a ``RuntimeError`` in channels-last format.

    Example:
        >>> x = torch.randn(1, 2, 3, 3)
        >>> call_in_layout(nn.Identity(), x, lambda t: t.is_contiguous(), Execution(memory_format="channels_last"))
        False
    """
    if not wants_channels_last(x, execution):
        return call(x)
    try:
        return call(x.contiguous(memory_format=torch.channels_last))
    except CnnlensError:
        raise
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise OptionError(
            f"{type(model).__name__} failed in channels-last memory format "
            f"(Execution(memory_format='channels_last')): {type(exc).__name__}: {exc}. A model that reshapes "
            "feature maps with .view() cannot run channels-last: pass execution=Execution(memory_format="
            "'contiguous') (the default), or fix the model (.reshape instead of .view)."
        ) from exc
