"""The rectifier override: guided backprop's and deconvnet's backward rules for every ReLU of a forward.

Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR Workshops 2015 (guided
backprop: ``R_in = (x > 0) * (R_out > 0) * R_out``) and Zeiler & Fergus, "Visualizing and Understanding
Convolutional Networks", ECCV 2014 (deconvnet: ``R_in = (R_out > 0) * R_out``). A ``TorchFunctionMode`` routes
module, functional and in-place ReLU/ReLU6 calls through one autograd function; nothing outlives the forward.

Example:
    >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
    >>> with RectifierOverride("guided"):
    ...     y = torch.relu(x)
    >>> torch.autograd.grad(y, x, torch.tensor([1.0, 1.0]))[0].tolist()
    [0.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cnnlens.errors import OptionError

__all__ = ["RectifierOverride", "ReluBackward"]

ReluBackward = Literal["normal", "guided", "deconvnet"]
"""How gradients cross ReLU/ReLU6 during a capture: autograd's own rule, guided backprop or deconvnet."""


class _RectifierBackward(torch.autograd.Function):
    """ReLU (or ReLU6 with ``upper``) whose backward is guided backprop's or deconvnet's rule."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, upper: float | None, mode: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.upper = upper
        ctx.mode = mode
        return x.clamp(0.0, upper) if upper is not None else x.clamp(min=0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        out = grad.clamp(min=0.0)  # both rules pass only positive gradients
        if ctx.mode == "guided":  # ... and guided backprop also keeps the forward mask
            mask = x > 0
            if ctx.upper is not None:
                mask &= x < ctx.upper
            out = out * mask
        return out, None, None


_RELU_FUNCS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    torch.Tensor.relu,
    torch.Tensor.relu_,
    torch.nn.functional.relu6,
}


class RectifierOverride(TorchFunctionMode):
    """Routes every ReLU and ReLU6 of a forward (modules, functional, in-place) through the chosen backward rule.

    In-place calls return a new tensor instead of modifying their input; code that relies on the side effect
    of a discarded ``x.relu_()`` result is not supported.
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("guided", "deconvnet"):
            raise OptionError(f"the rectifier override's mode must be 'guided' or 'deconvnet', got {mode!r}.")
        super().__init__()
        self.mode = mode
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELU_FUNCS:
            self.count += 1
            upper = 6.0 if func is torch.nn.functional.relu6 else None
            return _RectifierBackward.apply(args[0], upper, self.mode)
        if func is F.hardtanh:
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            if lo == 0.0:  # ReLU6 and friends
                self.count += 1
                return _RectifierBackward.apply(args[0], float(hi), self.mode)
        return func(*args, **kwargs)
