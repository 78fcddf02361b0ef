"""Opening a capture: :func:`capture`, :func:`record` (one shot) and :func:`forward_only` (no layers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch  # noqa: F401  (the examples below use it)
from torch import nn

from cnnlens.capture.core import Capture
from cnnlens.capture.layers import LayerSpec
from cnnlens.capture.layout import LayoutSpec
from cnnlens.capture.recording import Recording
from cnnlens.capture.rectifier import ReluBackward
from cnnlens.errors import LayerNotFoundError
from cnnlens.execution import Execution
from cnnlens.inputs import InputsSpec
from cnnlens.outputs import OutputSelector
from cnnlens.targets import TargetSpec

__all__ = ["capture", "forward_only", "record"]


def _layer_list(layers: Sequence[LayerSpec] | LayerSpec) -> list[LayerSpec]:
    if isinstance(layers, (str, nn.Module)):
        return [layers]
    if not isinstance(layers, Iterable):
        raise LayerNotFoundError(
            f"layers must be a layer (dotted name or module) or a sequence of them, got {type(layers).__name__}."
        )
    return list(layers)


def capture(
    model: nn.Module,
    layers: Sequence[LayerSpec] | LayerSpec,
    *,
    output_selector: OutputSelector | None = None,
    execution: Execution | None = None,
    layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
) -> Capture:
    """Open a capture of ``layers`` of ``model``: use it as a context manager.

    Args:
        model: Any ``nn.Module``; its output goes through :func:`cnnlens.outputs.to_logits`.
        layers: One layer or several (dotted names, ``name@k``, or modules).
        output_selector: Optional callable that picks the logits from the model output.
        execution: How to run (:class:`cnnlens.Execution`); the capture reads its ``memory_format``:
            ``"contiguous"`` (default) feeds the input as given, the accurate path; ``"channels_last"`` runs CPU
            forwards in channels-last format: 1.2-1.6x faster convolutions, but less accurate gradients
            (ResNet-50 guided backprop 1.1e-4 relative error against float64 instead of 2.6e-7; see
            ``Capture._call_model``). Recorded tensors are contiguous either way.
        layout: How each layer's output maps to the ``(B, C, h, w)`` view methods see
            (:mod:`cnnlens.capture.layout`): None or ``"auto"`` infers it (``nchw``; ``nhwc`` for Swin stages
            and permuted ConvNeXt layers; ``tokens`` with the model's prefix tokens and patch grid for ViTs);
            ``"nchw"``, ``"nhwc"``, ``"ncdhw"``, ``"tokens"``, ``"tokens:P"`` or ``"tokens:P:HxW"`` fixes it for
            every layer; a mapping layer name -> spec fixes it per layer. Checked before anything runs.

    Returns:
        A :class:`Capture`; ``run()`` inside the ``with`` block records one forward and its gradients.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> with capture(net, ["0", "1"]) as cap:
        ...     rec = cap.run(torch.randn(2, 3, 8, 8), targets=1)
        >>> rec.gradients["0"].shape
        torch.Size([1, 2, 4, 6, 6])
    """
    layer_list = _layer_list(layers)
    if not layer_list:
        raise LayerNotFoundError("no layer given; name at least one layer (see `cnnlens layers`).")
    return Capture(model, layer_list, output_selector=output_selector, execution=execution, layout=layout)


def record(
    model: nn.Module,
    inputs: InputsSpec,
    layers: Sequence[LayerSpec] | LayerSpec,
    targets: TargetSpec = None,
    *,
    top_k: int | None = None,
    gradients: bool = True,
    input_gradients: bool = False,
    relu_backward: ReluBackward = "normal",
    output_selector: OutputSelector | None = None,
    execution: Execution | None = None,
    layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
    additional_forward_args: Any = None,
) -> Recording:
    """One-shot :func:`capture`: open, run once, close (``layout`` as for :func:`capture`).

    ``inputs`` and ``additional_forward_args`` as for :meth:`Capture.run` (several inputs: a tuple or a mapping).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> record(net, torch.randn(1, 3, 8, 8), "0").activations["0"].shape
        torch.Size([1, 4, 6, 6])
    """
    with capture(model, layers, output_selector=output_selector, execution=execution, layout=layout) as cap:
        return cap.run(
            inputs,
            targets,
            top_k=top_k,
            gradients=gradients,
            input_gradients=input_gradients,
            relu_backward=relu_backward,
            additional_forward_args=additional_forward_args,
        )


def forward_only(
    model: nn.Module, *, output_selector: OutputSelector | None = None, execution: Execution | None = None
) -> Capture:
    """Open a capture with no layers, for forwards only: use it as a context manager and call ``forward``.

    :func:`capture` insists on at least one layer because a capture is usually for recording; metrics only
    need logits of perturbed inputs with the model's state restored afterwards. No hook is registered;
    ``Capture.forward`` runs the model in eval mode under ``torch.inference_mode``.

    Args:
        model: Any ``nn.Module``; its output goes through :func:`cnnlens.outputs.to_logits`.
        output_selector: Optional callable that picks the logits from the model output.
        execution: How to run (the capture reads its ``memory_format``; ``forward`` may override it per call).

    Returns:
        A :class:`Capture` without hooks; ``forward(x)`` returns logits (eval mode, no graph).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2), nn.Dropout()).train()
        >>> with forward_only(net) as cap:
        ...     logits = cap.forward(torch.randn(1, 3, 2, 2))
        >>> logits.shape, net.training
        (torch.Size([1, 2]), True)
    """
    return Capture(model, [], output_selector=output_selector, execution=execution)
