"""Differentiable capture: recorded activations that keep their autograd graph to the input.

For the forward views (activation maximisation, :mod:`cnnlens.views.maximize`): a :class:`Capture` subclass
whose run keeps the graph from the caller's input (for example an image parameterisation) through the recorded
layers, so an objective on the activations can be differentiated with ``torch.autograd.grad`` with respect to
the caller's own tensors. Same guarantees as :class:`Capture` (one :class:`~cnnlens.capture.ModelScope`:
handles removed in finally, eval mode for the call, every ``training`` and ``requires_grad`` flag restored). In
addition every parameter's ``requires_grad`` is off while the context is open, so no graph runs through the
weights: parameter ``.grad`` can never be written, even by a caller's ``.backward()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnlens.capture.api import _layer_list
from cnnlens.capture.core import Capture
from cnnlens.capture.layers import LayerRef, LayerSpec
from cnnlens.capture.layout import LayoutSpec
from cnnlens.errors import InputShapeError, LayerError, OptionError, TargetError
from cnnlens.outputs import OutputSelector, to_logits

__all__ = ["DifferentiableCapture", "GraphRecording", "differentiable_capture"]


@dataclass
class GraphRecording:
    """What one :meth:`DifferentiableCapture.run_graph` produced: tensors still attached to the input's graph.

    Attributes:
        layers: The layer keys in the order requested.
        activations: Layer key -> output in the map view ``(B, C, h, w)`` (channels-last and token layers mapped
            by their layout, prefix tokens left out), attached to the graph of the input (the model continued on
            a copy, so later in-place operations did not change them).
        logits: ``(B, K)`` the model's logits (attached), or None when the forward stopped after the last
            recorded layer (``stop_early=True``).
    """

    layers: list[str]
    activations: dict[str, torch.Tensor]
    logits: torch.Tensor | None


class _StopForwardSignal(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook of a stop-early capture once every requested layer has produced its output."""


class DifferentiableCapture(Capture):
    """A :class:`Capture` whose :meth:`run_graph` returns activations with their graph to the input.

    Use :func:`differentiable_capture` to open one. While the context is open the model is in eval mode and
    every parameter has ``requires_grad=False`` (its :class:`~cnnlens.capture.ModelScope` freezes them); on exit
    the hooks are removed and every flag is restored, exactly as for :class:`Capture`.
    """

    freeze_parameters = True

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec],
        *,
        output_selector: OutputSelector | None = None,
        stop_early: bool = False,
        layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
    ) -> None:
        if not isinstance(stop_early, bool):
            raise OptionError(f"stop_early must be True or False, got {stop_early!r}.")
        super().__init__(model, layers, output_selector=output_selector, layout=layout)
        self.stop_early = stop_early
        self._graph_run = False  # stop early only inside run_graph(), never in the inherited run()

    def __enter__(self) -> DifferentiableCapture:
        super().__enter__()
        return self

    def _make_hook(self, module: nn.Module, refs: list[LayerRef]) -> Any:
        record_output = super()._make_hook(module, refs)

        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            result = record_output(mod, args, output)
            if self._graph_run and self.stop_early and all(ref.key in self._acts for ref in self.refs):
                raise _StopForwardSignal
            return result

        return hook

    def _map_view(self, key: str, node: torch.Tensor) -> torch.Tensor:
        """The recorded output in its layer's map view, still attached to the graph."""
        layout = self.layouts.get(key)
        return node if layout is None or layout.is_identity else layout.to_maps(node)

    def run_graph(self, inputs: torch.Tensor) -> GraphRecording:
        """Run one forward and return the recorded activations still attached to ``inputs``' graph.

        Args:
            inputs: ``(B, C, H, W)`` or ``(C, H, W)``, usually a function of tensors the caller optimises.
                It is moved to the model's device and dtype differentiably, never detached.

        Returns:
            The :class:`GraphRecording`. Differentiate an objective on it with
            ``torch.autograd.grad(objective, [your_tensors])``.

        Raises:
            LayerError: Outside an active capture, or a requested layer did not run (or ran more than once
                in a forward that was not stopped early).
            TargetError: Inside ``torch.inference_mode()``, where no graph can be recorded.
            InputShapeError: ``inputs`` is not a tensor of rank 3 or 4.
        """
        if not self._entered:
            raise LayerError(
                "DifferentiableCapture.run_graph() needs an active capture: use `with differentiable_capture(...)`."
            )
        if torch.is_inference_mode_enabled():
            raise TargetError("a differentiable capture cannot run inside torch.inference_mode(); call it outside.")
        if not isinstance(inputs, torch.Tensor):
            raise InputShapeError(f"inputs must be a tensor (B, C, H, W), got {type(inputs).__name__}.")
        x = inputs.unsqueeze(0) if inputs.ndim == 3 else inputs
        if x.ndim != 4:
            raise InputShapeError(
                f"inputs must be a batch (B, C, H, W) or one image (C, H, W); got shape {tuple(inputs.shape)}."
            )
        param = next(self.model.parameters(), None)
        if param is not None and x.is_floating_point():
            x = x.to(device=param.device, dtype=param.dtype)
        self._clear()
        self._input_shape = tuple(int(d) for d in x.shape)
        prev_grad = torch.is_grad_enabled()
        self._recording = True
        self._record_graph = True
        self._graph_run = True
        logits: torch.Tensor | None = None
        try:
            torch.set_grad_enabled(True)
            stopped = False
            try:
                output = self.model(x)
            except _StopForwardSignal:
                stopped = True
            if not stopped:
                logits = to_logits(output, self.output_selector)
                if logits.shape[:1] != x.shape[:1]:
                    raise TargetError(
                        f"the model output has batch size {logits.shape[0] if logits.ndim else 'none'} for an "
                        f"input batch of {x.shape[0]}; pass output_selector= to pick the per-sample logits."
                    )
                self._check_layers_ran()
            recording = GraphRecording(
                layers=[ref.key for ref in self.refs],
                activations={ref.key: self._map_view(ref.key, self._graph[ref.key]) for ref in self.refs},
                logits=logits,
            )
        finally:
            torch.set_grad_enabled(prev_grad)
            self._recording = False
            self._record_graph = False
            self._graph_run = False
            self._clear()
        return recording


def differentiable_capture(
    model: nn.Module,
    layers: Sequence[LayerSpec] | LayerSpec,
    *,
    output_selector: OutputSelector | None = None,
    stop_early: bool = False,
    layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
) -> DifferentiableCapture:
    """Open a capture whose recorded activations keep their autograd graph to the input.

    For objectives on activations that are optimised through the input, such as activation maximisation
    (Olah et al., "Feature Visualization", Distill 2017): ``x = f(theta)``, ``a = layer(x)``, and
    ``d objective(a) / d theta`` by ``torch.autograd.grad``. Parameters never receive ``.grad``: their
    ``requires_grad`` is off while the context is open (and restored afterwards).

    Args:
        model: Any ``nn.Module``.
        layers: One layer or several (dotted names, ``name@k``, or modules); none (``[]``) when only the
            logits are needed.
        output_selector: Optional callable that picks the logits from the model output.
        stop_early: End each forward as soon as every requested layer has produced its output (the rest of
            the network is not run and ``logits`` is None). Saves the tail of the forward when the
            objective needs no logits; a shared module called again after that point is not detected, so
            name the call (``name@k``) for shared modules.
        layout: Layer layouts, as for :func:`cnnlens.capture.capture`: activations come in the map view.

    Returns:
        A :class:`DifferentiableCapture`; ``run_graph(x)`` inside the ``with`` block gives a
        :class:`GraphRecording` (the inherited ``run()`` works as for :func:`capture`).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> theta = torch.zeros(1, 3, 8, 8, requires_grad=True)
        >>> with differentiable_capture(net, "1") as cap:
        ...     rec = cap.run_graph(torch.sigmoid(theta))
        >>> (g,) = torch.autograd.grad(rec.activations["1"][:, 0].mean(), [theta])
        >>> g.shape, net[0].weight.grad is None
        (torch.Size([1, 3, 8, 8]), True)
    """
    return DifferentiableCapture(
        model, _layer_list(layers), output_selector=output_selector, stop_early=stop_early, layout=layout
    )
