"""Capture: the only place where cnnlens touches a model with hooks.

One :func:`capture` context records the outputs of many layers in one forward pass and the gradients of
one or several target scores with respect to all of them in one ``torch.autograd.grad`` call per target.
It never calls ``.backward()``: parameter ``.grad`` is never touched and no graph is kept afterwards.

Guarantees (tested by the contract tests):

* Hooks are forward hooks registered on ``__enter__`` and removed in ``finally`` on ``__exit__``, also when
  the model's forward raises; one :class:`ModelScope` does it for every capture, the shape probe and the
  replay's hook path.
* The model is put in eval mode for the duration and every module's ``training`` flag is restored
  afterwards; parameters' ``requires_grad`` flags are restored too.
* Every argument is checked before any state changes (no hook, no flag is touched by a call that is refused).
* Recorded activations are never changed by later in-place operations (``ReLU(inplace=True)``,
  ``out += identity``): the model continues on a copy of the recorded tensor, so the recorded activation and
  the gradient are both those of the layer's own output, before any in-place change.
* Gradients are aligned with layers by name, never by the order in which they arrive.
* Activations and gradients are recorded in the ``(B, C, h, w)`` map view of each layer's layout
  (:mod:`~cnnlens.capture.layout`: token and channels-last outputs mapped, prefix tokens left out); the
  gradient is taken with respect to the raw output and mapped by the same map.
* No autograd graph is recorded before the first target layer runs (the forward starts in no-grad mode and
  the first hooked layer switches recording on), so a capture costs little more than inference.
* No state outlives the objects a caller holds: the replayer of a capture is :attr:`Capture.replayer`, the
  memo of a probe is the probe's own; nothing is remembered per model.

Modules: :mod:`~cnnlens.capture.scope` (:class:`ModelScope`), :mod:`~cnnlens.capture.layers` (resolution,
:func:`probe_layers`), :mod:`~cnnlens.capture.rectifier` (guided backprop/deconvnet rules),
:mod:`~cnnlens.capture.recording` and :mod:`~cnnlens.capture.core` (:class:`Recording`, :class:`Capture`),
:mod:`~cnnlens.capture.memory` (channels-last or not),
:mod:`~cnnlens.capture.layout` (layer layouts: nchw, nhwc, tokens, ncdhw),
:mod:`~cnnlens.capture.tokentail` (a class-token ViT's last block on the rows its head reads),
:mod:`~cnnlens.capture.api` (:func:`capture`, :func:`record`, :func:`forward_only`),
:mod:`~cnnlens.capture.probe` (:class:`Probe`), :mod:`~cnnlens.capture.replay` (the fx tail replayer) and
:mod:`~cnnlens.capture.differentiable` (:func:`differentiable_capture`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> with capture(net, ["0", "1"]) as cap:
    ...     rec = cap.run(torch.randn(2, 3, 8, 8), targets=1)
    >>> sorted(rec.activations), tuple(rec.gradients["1"].shape)
    (['0', '1'], (1, 2, 4, 6, 6))
"""

from __future__ import annotations

from cnnlens.capture.api import capture, forward_only, record
from cnnlens.capture.core import Capture
from cnnlens.capture.differentiable import DifferentiableCapture, GraphRecording, differentiable_capture
from cnnlens.capture.layers import LayerInfo, LayerRef, LayerSpec, probe_layers, resolve_layer
from cnnlens.capture.layout import Layout, LayoutKind, LayoutSpec, infer_layout, parse_layout, token_geometry
from cnnlens.capture.probe import Probe
from cnnlens.capture.recording import Recording
from cnnlens.capture.rectifier import RectifierOverride, ReluBackward
from cnnlens.capture.replay import Replayer, RowSource, replay_path, replay_rows
from cnnlens.capture.scope import ModelScope
from cnnlens.execution import MemoryFormat

__all__ = [
    "Capture",
    "DifferentiableCapture",
    "GraphRecording",
    "LayerInfo",
    "LayerRef",
    "LayerSpec",
    "Layout",
    "LayoutKind",
    "LayoutSpec",
    "MemoryFormat",
    "ModelScope",
    "Probe",
    "Recording",
    "RectifierOverride",
    "ReluBackward",
    "Replayer",
    "RowSource",
    "capture",
    "differentiable_capture",
    "forward_only",
    "infer_layout",
    "parse_layout",
    "probe_layers",
    "record",
    "replay_path",
    "replay_rows",
    "resolve_layer",
    "token_geometry",
]
