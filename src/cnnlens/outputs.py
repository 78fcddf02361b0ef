"""One adapter from whatever a model returns to a logits tensor.

Models return plain tensors, tuples, dicts, torchvision ``InceptionOutputs`` (a namedtuple with
``.logits``) or objects with a ``.logits`` attribute (Hugging Face style). Every cnnlens component goes
through :func:`to_logits`; no method unwraps outputs on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from cnnlens.errors import OutputAdapterError

__all__ = ["OutputSelector", "to_logits"]

OutputSelector = Callable[[Any], torch.Tensor]
"""A user callable that picks the logits tensor out of a model output."""


def _describe(output: object) -> str:
    if isinstance(output, torch.Tensor):
        return f"Tensor{tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {sorted(map(str, output.keys()))}"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__} of {len(output)} items"
    return type(output).__name__


def to_logits(output: Any, selector: OutputSelector | None = None) -> torch.Tensor:
    """Return the logits tensor held by a model output.

    The rules, in order: a ``selector`` given by the user wins; a tensor is returned as is; an object with a
    tensor attribute ``logits`` (torchvision ``InceptionOutputs``, Hugging Face outputs) gives that; a
    mapping gives its ``"logits"`` entry, else ``"out"``, else its only tensor value; a tuple or list gives
    its first element (recursively).

    Args:
        output: What ``model(x)`` returned.
        selector: Optional callable ``output -> Tensor`` for layouts the rules above do not cover.

    Returns:
        The logits tensor, usually of shape ``(B, num_classes)``.

    Raises:
        OutputAdapterError: When no tensor can be found; the message describes what was received.

    Example:
        >>> to_logits({"logits": torch.zeros(2, 10)}).shape
        torch.Size([2, 10])
    """
    if selector is not None:
        picked = selector(output)
        if not isinstance(picked, torch.Tensor):
            raise OutputAdapterError(
                f"the output selector returned {type(picked).__name__}, not a tensor; make it return the "
                "logits tensor of shape (batch, num_classes)."
            )
        return picked
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        for key in ("logits", "out"):
            value = output.get(key)
            if isinstance(value, torch.Tensor):
                return value
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    elif isinstance(output, (tuple, list)) and output:
        return to_logits(output[0])
    raise OutputAdapterError(
        f"cannot find the logits in the model output ({_describe(output)}); pass output_selector=, a "
        "callable that returns the logits tensor, e.g. lambda out: out['scores']."
    )
