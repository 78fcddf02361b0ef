"""The one object that changes a model's state for a block and puts every bit of it back.

:class:`ModelScope` is what every capture (:class:`~cnnlens.capture.Capture`, the differentiable capture, the
shape probe of :func:`~cnnlens.capture.probe_layers`, the hook path of the replay) and anything else that needs
a model in eval mode uses: it switches the model to eval mode, registers forward hooks, optionally freezes the
parameters, and in ``finally`` removes every handle and restores every module's ``training`` flag and every
parameter's ``requires_grad``, also when the block raises.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from cnnlens.errors import LayerError, ModelTypeError, OptionError

__all__ = ["ModelScope"]

ForwardHook = Callable[[nn.Module, Any, Any], Any]
"""``hook(module, args, output) -> replacement output or None`` (``nn.Module.register_forward_hook``)."""


class ModelScope:
    """Eval mode, forward hooks and frozen parameters for the duration of a block; all undone in ``finally``.

    Only a model with some module in training mode is switched (and snapshotted): ``eval()`` rewrites the flag of
    every module through ``nn.Module.__setattr__``, a millisecond on a model of a few hundred modules, and an
    eval-mode model (the usual case) needs nothing. Flags are written back only where they differ.

    Args:
        model: The network.
        modules: ``model``'s modules when the caller already has them (e.g. ``dict(model.named_modules())
            .values()``), so that one traversal serves both; the root must be among them.
        eval_mode: Put the model in eval mode for the block.
        freeze_parameters: Set ``requires_grad=False`` on every parameter for the block (nothing can then write
            a parameter's ``.grad``, even a caller's ``.backward()``).

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        OptionError: ``eval_mode`` or ``freeze_parameters`` is not a bool.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with ModelScope(net, freeze_parameters=True) as scope:
        ...     _ = scope.add_forward_hook(net[0], lambda module, args, output: None)
        ...     net.training, net[0].weight.requires_grad, len(net[0]._forward_hooks)
        (False, False, 1)
        >>> net.training, net[0].weight.requires_grad, len(net[0]._forward_hooks)
        (True, True, 0)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: Collection[nn.Module] | None = None,
        eval_mode: bool = True,
        freeze_parameters: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        for name, flag in (("eval_mode", eval_mode), ("freeze_parameters", freeze_parameters)):
            if not isinstance(flag, bool):
                raise OptionError(f"ModelScope {name} must be True or False, got {flag!r}.")
        self.model = model
        self.eval_mode = eval_mode
        self.freeze_parameters = freeze_parameters
        self._modules = modules
        self._handles: list[RemovableHandle] = []
        self._training: dict[nn.Module, bool] = {}
        self._requires_grad: dict[nn.Parameter, bool] = {}
        self.active = False

    def __enter__(self) -> ModelScope:
        if self.active:
            raise LayerError("this model scope is already active; open a new one instead of re-entering it.")
        try:
            if self.eval_mode:
                modules = self._modules if self._modules is not None else list(self.model.modules())
                if any(m.training for m in modules):
                    self._training = {m: m.training for m in modules}
                    self.model.eval()
            if self.freeze_parameters:
                self._requires_grad = {p: p.requires_grad for p in self.model.parameters()}
                for param in self._requires_grad:
                    param.requires_grad_(False)
        except BaseException:
            self.restore()
            raise
        self.active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def add_forward_hook(
        self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False
    ) -> RemovableHandle:
        """Register ``hook`` on ``module`` for the life of the scope (removed by :meth:`restore`).

        With ``with_kwargs=True`` the hook is ``hook(module, args, kwargs, output)`` (PyTorch's own flag).
        """
        if not self.active:
            raise LayerError("ModelScope.add_forward_hook() needs an active scope: use `with ModelScope(model):`.")
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def add_forward_pre_hook(
        self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False
    ) -> RemovableHandle:
        """Register a forward pre-hook on ``module`` for the life of the scope (removed by :meth:`restore`).

        ``hook(module, args)`` (or ``hook(module, args, kwargs) -> (args, kwargs)`` with ``with_kwargs=True``).
        """
        if not self.active:
            raise LayerError("ModelScope.add_forward_pre_hook() needs an active scope: use `with ModelScope(model):`.")
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def restore(self) -> None:
        """Remove every handle, restore every ``training`` and ``requires_grad`` flag; idempotent."""
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles.clear()
            for module, flag in self._training.items():
                if module.training != flag:
                    module.training = flag
            for param, flag in self._requires_grad.items():
                if param.requires_grad != flag:
                    param.requires_grad_(flag)
            self._training = {}
            self._requires_grad = {}
            self.active = False
