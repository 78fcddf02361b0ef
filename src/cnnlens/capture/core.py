"""The core capture: :class:`Capture`, the state of one :func:`~cnnlens.capture.capture` context.

See :mod:`cnnlens.capture` for the guarantees. A capture owns one :class:`~cnnlens.capture.ModelScope` while it
is open (hooks, eval mode, flags restored in ``finally``) and, once a replay asks for it, one
:class:`~cnnlens.capture.replay.Replayer` held in :attr:`Capture.replayer` for the life of the object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from cnnlens.capture.layers import LayerRef, LayerSpec, check_layers_ran, check_model, resolve_layer
from cnnlens.capture.layout import Layout, LayoutResolver, LayoutSpec
from cnnlens.capture.memory import call_in_layout, wants_channels_last
from cnnlens.capture.recording import Recording, _grad, _is_target_list, _stack
from cnnlens.capture.rectifier import RectifierOverride, ReluBackward
from cnnlens.capture.replay import Replayer, input_shape_of
from cnnlens.capture.rows import replay_tensor
from cnnlens.capture.scope import ModelScope
from cnnlens.capture.tokentail import tail_applied, token_tail
from cnnlens.errors import InputShapeError, LayerError, OptionError, TargetError
from cnnlens.execution import Execution, as_execution
from cnnlens.inputs import InputsSpec, ModelInputs, as_model_inputs, is_multi
from cnnlens.outputs import OutputSelector, to_logits
from cnnlens.targets import Target, TargetSpec, expand_targets, resolve_targets

__all__ = ["Capture"]

_RULES = ("normal", "guided", "deconvnet")


class Capture:
    """The state of one :func:`capture` context; see :mod:`cnnlens.capture` for its guarantees.

    Attributes:
        model: The network.
        refs: The resolved layers (duplicates removed), in the order requested.
        execution: How to run (the capture reads its ``memory_format``).
        output_selector: Picks the logits from the model output, or None.
        layouts: Layer key -> the :class:`~cnnlens.capture.Layout` of its output in the last forward that
            recorded it (given or inferred; see :mod:`cnnlens.capture.layout`), None for an output with no layout
            (not spatial).
    """

    freeze_parameters = False
    """Whether the scope switches every parameter's ``requires_grad`` off while open (the differentiable
    capture does)."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec],
        *,
        output_selector: OutputSelector | None = None,
        execution: Execution | None = None,
        layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
    ) -> None:
        check_model(model, output_selector)
        self.execution = as_execution(execution)
        self.model = model
        self._modules = dict(model.named_modules())  # one traversal serves resolution and the scope
        refs = [resolve_layer(model, layer, modules=self._modules) for layer in layers]
        seen: set[str] = set()
        self.refs: list[LayerRef] = []
        for ref in refs:
            if ref.key not in seen:
                seen.add(ref.key)
                self.refs.append(ref)
        self._layout = LayoutResolver(model, layout, self.refs, self._modules)
        # Recorded forwards run a class-token ViT's last block on the rows its head reads (see tokentail).
        self._tail = token_tail(model, [(r.name, r.module) for r in self.refs]) if self.execution.token_tail else None
        self.layouts: dict[str, Layout | None] = {}  # None: an output that is not spatial, recorded as it is
        self._input_shape: tuple[int, ...] = ()
        self.output_selector = output_selector
        self._scope: ModelScope | None = None
        self._replayer: Replayer | None = None
        self._entered = False
        # Per-forward state.
        self._recording = False
        self._record_graph = False
        self._calls: dict[nn.Module, int] = {}
        self._graph: dict[str, torch.Tensor] = {}
        self._acts: dict[str, torch.Tensor] = {}
        self._multi_call: dict[str, int] = {}
        self._prefix: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """Whether the capture is open (inside its ``with`` block)."""
        return self._entered

    @property
    def replayer(self) -> Replayer:
        """The replay state of this capture (traced tails per layer), created on first use, kept for its life."""
        if self._replayer is None:
            self._replayer = Replayer(self.model, self.output_selector, layout_of=self.layout_of)
        return self._replayer

    # -- context management -------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._entered:
            raise LayerError("this capture is already active; open a new capture() instead of re-entering it.")
        scope = ModelScope(self.model, modules=self._modules.values(), freeze_parameters=self.freeze_parameters)
        scope.__enter__()
        try:
            by_module: dict[nn.Module, list[LayerRef]] = {}
            for ref in self.refs:
                by_module.setdefault(ref.module, []).append(ref)
            for module, refs in by_module.items():
                scope.add_forward_hook(module, self._make_hook(module, refs))
        except BaseException:
            scope.restore()
            raise
        self._scope = scope
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        try:
            if self._scope is not None:
                self._scope.restore()
        finally:
            self._scope = None
            self._clear()
            self._entered = False

    def _clear(self) -> None:
        self._graph = {}
        self._acts = {}
        self._calls = {}
        self._multi_call = {}
        self._prefix = {}

    # -- layouts -----------------------------------------------------------------------------------
    def layout_of(self, ref: LayerRef, output: torch.Tensor, input_shape: tuple[int, ...]) -> Layout | None:
        """The layout of ``ref``'s ``output`` for an input of ``input_shape`` (see :class:`LayoutResolver`)."""
        return self._layout.of(ref, output, input_shape)

    def _map_grad(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """A gradient w.r.t. a layer's raw output in the map view of that layer (contiguous)."""
        layout = self.layouts.get(key)
        return g.contiguous() if layout is None or layout.is_identity else layout.to_maps(g).contiguous()

    # -- hooks -------------------------------------------------------------------------------------
    def _make_hook(self, module: nn.Module, refs: list[LayerRef]) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            if not self._recording:
                return None
            call = self._calls.get(module, 0)
            self._calls[module] = call + 1
            wanted = [r for r in refs if r.call is None or r.call == call]
            if not wanted:
                return None
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {refs[0].name!r} returns {type(output).__name__}, not a tensor; target a "
                    "submodule whose output is a feature-map tensor."
                )
            if self._record_graph:
                # Everything before the first target layer ran without recording a graph.
                torch.set_grad_enabled(True)
                node = output if output.requires_grad else output.detach().requires_grad_(True)
            elif output.requires_grad:
                # Input gradients only: the graph from the input runs through this layer; keep it.
                node = output
            else:
                node = output.detach()
            for ref in wanted:
                if ref.call is None and call > 0:
                    self._multi_call[ref.key] = call + 1
                self._graph[ref.key] = node
                # The map view, contiguous whatever memory format the forward used.
                self._acts[ref.key], prefix, self.layouts[ref.key] = self._layout.record(ref, node, self._input_shape)
                if prefix is not None:
                    self._prefix[ref.key] = prefix
            # The model continues on a copy, so no later in-place op can change what we recorded.
            return node.clone()

        return hook

    # -- running -----------------------------------------------------------------------------------
    def _call_model(self, x: Any, call: Callable[[Any], Any], execution: Execution | None = None) -> Any:
        """``call(x)`` in the memory layout of ``execution`` (else the capture's): see :func:`call_in_layout`.

        For several inputs (:class:`~cnnlens.inputs.ModelInputs`) every 4-D floating-point input is converted.
        """
        ex = execution if execution is not None else self.execution
        if isinstance(x, ModelInputs):
            rest = x.map(lambda t: t.contiguous(memory_format=torch.channels_last) if wants_channels_last(t, ex) else t)
            return call_in_layout(self.model, x.primary, lambda p: call(rest.replace(x.names[0], p)), ex)
        return call_in_layout(self.model, x, call, ex)

    def _prepare_input(self, inputs: Any, additional_forward_args: Any = None) -> Any:
        """A tensor (as today, no wrapper) or, for several inputs or extra arguments, a prepared ModelInputs."""
        if is_multi(inputs, additional_forward_args):
            return self._prepare_inputs(as_model_inputs(inputs, additional_forward_args))
        if not isinstance(inputs, torch.Tensor):
            raise InputShapeError(f"inputs must be a tensor (B, C, H, W), got {type(inputs).__name__}.")
        if inputs.ndim == 3:
            inputs = inputs.unsqueeze(0)
        if inputs.ndim < 2:
            raise InputShapeError(
                f"inputs must be a batch (B, C, H, W) or one image (C, H, W); got shape {tuple(inputs.shape)}."
            )
        param = next(self.model.parameters(), None)
        if param is not None:
            dtype = param.dtype if inputs.is_floating_point() else inputs.dtype
            inputs = inputs.to(device=param.device, dtype=dtype)
        # Inference-mode tensors cannot enter an autograd graph: a clone made here is a normal tensor.
        return inputs.detach().clone() if inputs.is_inference() else inputs.detach()

    def _prepare_inputs(self, inputs: ModelInputs) -> ModelInputs:
        """Every explained and per-sample extra tensor moved like a lone input (device; dtype if floating)."""
        param = next(self.model.parameters(), None)

        def move(t: torch.Tensor) -> torch.Tensor:
            if param is not None:
                t = t.to(device=param.device, dtype=param.dtype if t.is_floating_point() else t.dtype)
            return t.detach().clone() if t.is_inference() else t.detach()

        return inputs.map(move, all_extras=True)

    def run(
        self,
        inputs: InputsSpec,
        targets: TargetSpec | list[Target] = None,
        *,
        top_k: int | None = None,
        gradients: bool = True,
        input_gradients: bool = False,
        relu_backward: ReluBackward = "normal",
        additional_forward_args: Any = None,
    ) -> Recording:
        """Run one forward and, if asked, one gradient pass per target, recording every layer.

        Every argument is checked before the model runs or any state changes.

        Args:
            inputs: ``(B, C, H, W)`` or ``(C, H, W)``; moved to the model's device and dtype. Several inputs: a
                tuple/list of tensors, a mapping keyword -> tensor or a :class:`~cnnlens.inputs.ModelInputs`
                (each explained input gets its own input gradient; see :mod:`cnnlens.inputs`).
            targets: What to explain (see :func:`cnnlens.targets.resolve_targets`).
            top_k: Explain the top-k classes of each sample instead of ``targets``.
            gradients: Compute gradients of the scores with respect to the recorded layers.
            input_gradients: Also compute gradients with respect to the input (for pixel attributions).
            relu_backward: ``"guided"`` (guided backprop: only positive gradients through positive inputs)
                or ``"deconvnet"`` (only positive gradients) replace the backward rule of every ReLU and
                ReLU6 for this run (modules, functional and in-place calls alike); ``"normal"`` keeps
                autograd's rule. Nothing of the override outlives the call.
            additional_forward_args: Arguments passed to the model after the inputs, neither explained nor
                differentiated (captum's convention; see :func:`cnnlens.inputs.as_model_inputs`).

        Returns:
            The :class:`Recording`.

        Raises:
            LayerError: A requested layer did not run, ran more than once, or returned a non-tensor.
            TargetError: A target does not fit the model's output.
            OptionError: ``relu_backward``, ``gradients`` or ``input_gradients`` has an invalid value.
        """
        if not self._entered:
            raise LayerError("Capture.run() needs an active capture: use `with capture(model, layers) as cap:`.")
        if relu_backward not in _RULES:
            raise OptionError(f"relu_backward must be 'normal', 'guided' or 'deconvnet', got {relu_backward!r}.")
        for name, flag in (("gradients", gradients), ("input_gradients", input_gradients)):
            if not isinstance(flag, bool):
                raise OptionError(f"{name} must be True or False, got {flag!r}.")
        need_grad = gradients or input_gradients
        if need_grad and torch.is_inference_mode_enabled():
            raise TargetError("gradients cannot be computed inside torch.inference_mode(); call cnnlens outside it.")
        target_list: list[Target] = targets if _is_target_list(targets) else resolve_targets(targets, top_k=top_k)
        x = self._prepare_input(inputs, additional_forward_args)
        if input_gradients:
            x = _differentiable(x)
        self._clear()
        self._input_shape = input_shape_of(x)
        prev_grad = torch.is_grad_enabled()
        self._recording = True
        self._record_graph = gradients and need_grad
        try:
            logits = self._record_forward(x, input_gradients, relu_backward)
            torch.set_grad_enabled(need_grad)
            recording = self._score_and_differentiate(x, logits, target_list, gradients, input_gradients)
        finally:
            torch.set_grad_enabled(prev_grad)
            self._recording = False
            self._record_graph = False
            self._clear()
        return recording

    def _record_forward(self, x: Any, input_gradients: bool, relu_backward: ReluBackward) -> torch.Tensor:
        """The recorded forward of :meth:`run`: logits checked against the batch, every layer checked to have run."""

        def attempt(inp: Any) -> Any:
            self._clear()
            torch.set_grad_enabled(input_gradients)
            if relu_backward == "normal":
                with tail_applied(self._tail):
                    return _invoke(self.model, inp)
            override = RectifierOverride(relu_backward)
            with override:
                out = _invoke(self.model, inp)
            if override.count == 0:
                raise LayerError(
                    f"relu_backward={relu_backward!r} found no ReLU or ReLU6 in {type(self.model).__name__}'s "
                    "forward; guided backprop and deconvnet are defined for rectifier networks only."
                )
            return out

        logits = to_logits(self._call_model(x, attempt), self.output_selector)
        batch = x.batch if isinstance(x, ModelInputs) else x.shape[0]
        if logits.ndim == 0 or logits.shape[0] != batch:
            raise TargetError(
                f"the model output has batch size {logits.shape[0] if logits.ndim else 'none'} for an "
                f"input batch of {batch}; pass output_selector= to pick the per-sample logits."
            )
        self._check_layers_ran()
        return logits

    def _score_and_differentiate(
        self,
        x: Any,
        logits: torch.Tensor,
        target_list: list[Target],
        gradients: bool,
        input_gradients: bool,
    ) -> Recording:
        """Scores of every target and one ``autograd.grad`` per target with respect to all recorded layers."""
        target_list = expand_targets(target_list, logits.detach())
        score_list = [target(logits) for target in target_list]
        classes = [target.class_indices(logits.detach()) for target in target_list]
        grads: dict[str, list[torch.Tensor]] = {ref.key: [] for ref in self.refs} if gradients else {}
        # One gradient per differentiable input: the lone tensor, or every floating-point explained input.
        in_names = _grad_names(x) if input_gradients else []
        in_grads: dict[str, list[torch.Tensor]] = {name: [] for name in in_names}
        if gradients or input_gradients:
            wrt = [self._graph[ref.key] for ref in self.refs] if gradients else []
            n_layers = len(wrt)
            wrt += [x.tensor(n) for n in in_names] if isinstance(x, ModelInputs) else [x] if input_gradients else []
            for t, score in enumerate(score_list):
                results = _grad(score, wrt, retain=t < len(score_list) - 1)
                if gradients:
                    for ref, g in zip(self.refs, results, strict=False):
                        grads[ref.key].append(self._map_grad(ref.key, g))
                for name, g in zip(in_names, results[n_layers:], strict=True):
                    in_grads[name].append(g.contiguous())
        multi = x if isinstance(x, ModelInputs) else None
        by_input = {name: _stack(v) for name, v in in_grads.items()}
        first = None if not input_gradients else by_input.get(multi.names[0] if multi is not None else "0")
        return Recording(
            layers=[ref.key for ref in self.refs],
            inputs=multi.primary.detach() if multi is not None else x.detach(),
            model_inputs=multi.map(torch.Tensor.detach, extras=True) if multi is not None else None,
            input_gradients_by_input=by_input if multi is not None else {},
            logits=logits.detach(),
            activations=dict(self._acts),
            layouts={ref.key: lay for ref in self.refs if (lay := self.layouts.get(ref.key)) is not None},
            prefix_tokens=dict(self._prefix),
            gradients={k: _stack(v) for k, v in grads.items()},
            input_gradients=first,
            scores=torch.stack([s.detach() for s in score_list], dim=1),
            target_classes=torch.stack(classes, dim=1),
            target_names=[t.name for t in target_list],
            targets=list(target_list),
        )

    def forward(
        self, inputs: InputsSpec, *, execution: Execution | None = None, additional_forward_args: Any = None
    ) -> torch.Tensor:
        """Run the model without recording (eval mode, no graph) and return its logits.

        Used by perturbation methods and metrics for their extra forwards.

        Args:
            inputs: The input batch (a tensor, or several inputs as in :meth:`run`).
            execution: Overrides the capture's execution (its ``memory_format``) for this call.
            additional_forward_args: Passed to the model after the inputs, as in :meth:`run`.
        """
        if execution is not None:
            as_execution(execution)
        if not self._entered:
            raise LayerError("Capture.forward() needs an active capture.")
        x = self._prepare_input(inputs, additional_forward_args)
        with torch.inference_mode():
            return to_logits(self._call_model(x, lambda i: _invoke(self.model, i), execution), self.output_selector)

    def replay(
        self,
        layer: LayerSpec,
        activations: torch.Tensor,
        sample_index: torch.Tensor | Sequence[int],
        *,
        inputs: InputsSpec,
        logits: torch.Tensor | None = None,
        batch_budget_mb: float | None = None,
        execution: Execution | None = None,
    ) -> torch.Tensor:
        """Logits of the model when ``layer``'s output is replaced by ``activations`` (rows in its map view).

        Row ``n`` replaces the layer's output for original sample ``sample_index[n]`` of ``inputs``; see
        :func:`cnnlens.capture.rows.replay_tensor` for the arguments, the two replay paths and the errors.

        """
        return replay_tensor(
            self,
            layer,
            activations,
            sample_index,
            inputs=inputs,
            logits=logits,
            batch_budget_mb=batch_budget_mb,
            execution=execution,
        )

    def _check_layers_ran(self) -> None:
        check_layers_ran(self.refs, self._acts, self._calls, self._multi_call)


def _invoke(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or the call of several inputs (:meth:`ModelInputs.call`)."""
    return x.call(model) if isinstance(x, ModelInputs) else model(x)


def _grad_names(x: Any) -> list[str]:
    """The inputs that get an input gradient: the lone tensor ("0"), or every floating-point explained input."""
    if isinstance(x, ModelInputs):
        return [n for n, t in zip(x.names, x.tensors, strict=True) if t.requires_grad]
    return ["0"]


def _differentiable(x: Any) -> Any:
    """Fresh leaves that require grad: the lone tensor, or every floating-point explained input."""
    if isinstance(x, ModelInputs):
        return x.map(lambda t: t.clone().requires_grad_(True) if t.is_floating_point() else t)
    return x.clone().requires_grad_(True)
