"""The core capture: :class:`Capture`, the state of one :func:`~cnnlens.capture.capture` context.

See :mod:`cnnlens.capture` for the guarantees. A capture owns one :class:`~cnnlens.capture.ModelScope` while it
is open (hooks, eval mode, flags restored in ``finally``) and, once a replay asks for it, one
:class:`~cnnlens.capture.replay.Replayer` held in :attr:`Capture.replayer` for the life of the object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from cnnlens.capture.layers import LayerRef, LayerSpec, resolve_layer
from cnnlens.capture.memory import call_in_layout
from cnnlens.capture.recording import Recording, _grad, _is_target_list, _stack
from cnnlens.capture.rectifier import RectifierOverride, ReluBackward
from cnnlens.capture.replay import Replayer, replay_rows
from cnnlens.capture.scope import ModelScope
from cnnlens.errors import (
    InputShapeError,
    LayerError,
    ModelTypeError,
    OptionError,
    TargetError,
)
from cnnlens.execution import Execution, as_execution
from cnnlens.outputs import OutputSelector, to_logits
from cnnlens.targets import Target, TargetSpec, resolve_targets

__all__ = ["Capture"]

_RULES = ("normal", "guided", "deconvnet")


def _check_model(model: object, output_selector: object) -> None:
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if output_selector is not None and not callable(output_selector):
        raise OptionError(
            f"output_selector must be a callable (model output -> logits tensor) or None, got "
            f"{type(output_selector).__name__}."
        )


class Capture:
    """The state of one :func:`capture` context; see :mod:`cnnlens.capture` for its guarantees.

    Attributes:
        model: The network.
        refs: The resolved layers (duplicates removed), in the order requested.
        execution: How to run (the capture reads its ``memory_format``).
        output_selector: Picks the logits from the model output, or None.
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
    ) -> None:
        _check_model(model, output_selector)
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

    @property
    def active(self) -> bool:
        """Whether the capture is open (inside its ``with`` block)."""
        return self._entered

    @property
    def replayer(self) -> Replayer:
        """The replay state of this capture (traced tails per layer), created on first use, kept for its life."""
        if self._replayer is None:
            self._replayer = Replayer(self.model, self.output_selector)
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
                self._acts[ref.key] = node.detach().contiguous()  # standard layout whatever the forward used
            # The model continues on a copy, so no later in-place op can change what we recorded.
            return node.clone()

        return hook

    # -- running -----------------------------------------------------------------------------------
    def _call_model(
        self, x: torch.Tensor, call: Callable[[torch.Tensor], Any], execution: Execution | None = None
    ) -> Any:
        """``call(x)`` in the memory layout of ``execution`` (else the capture's): see :func:`call_in_layout`."""
        return call_in_layout(self.model, x, call, execution if execution is not None else self.execution)

    def _prepare_input(self, inputs: torch.Tensor) -> torch.Tensor:
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

    def run(
        self,
        inputs: torch.Tensor,
        targets: TargetSpec | list[Target] = None,
        *,
        top_k: int | None = None,
        gradients: bool = True,
        input_gradients: bool = False,
        relu_backward: ReluBackward = "normal",
    ) -> Recording:
        """Run one forward and, if asked, one gradient pass per target, recording every layer.

        Every argument is checked before the model runs or any state changes.

        Args:
            inputs: ``(B, C, H, W)`` or ``(C, H, W)``; moved to the model's device and dtype.
            targets: What to explain (see :func:`cnnlens.targets.resolve_targets`).
            top_k: Explain the top-k classes of each sample instead of ``targets``.
            gradients: Compute gradients of the scores with respect to the recorded layers.
            input_gradients: Also compute gradients with respect to the input (for pixel attributions).
            relu_backward: ``"guided"`` (guided backprop: only positive gradients through positive inputs)
                or ``"deconvnet"`` (only positive gradients) replace the backward rule of every ReLU and
                ReLU6 for this run (modules, functional and in-place calls alike); ``"normal"`` keeps
                autograd's rule. Nothing of the override outlives the call.

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
        x = self._prepare_input(inputs)
        if input_gradients:
            x = x.clone().requires_grad_(True)
        self._clear()
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

    def _record_forward(self, x: torch.Tensor, input_gradients: bool, relu_backward: ReluBackward) -> torch.Tensor:
        """The recorded forward of :meth:`run`: logits checked against the batch, every layer checked to have run."""

        def attempt(inp: torch.Tensor) -> Any:
            self._clear()
            torch.set_grad_enabled(input_gradients)
            if relu_backward == "normal":
                return self.model(inp)
            override = RectifierOverride(relu_backward)
            with override:
                out = self.model(inp)
            if override.count == 0:
                raise LayerError(
                    f"relu_backward={relu_backward!r} found no ReLU or ReLU6 in {type(self.model).__name__}'s "
                    "forward; guided backprop and deconvnet are defined for rectifier networks only."
                )
            return out

        logits = to_logits(self._call_model(x, attempt), self.output_selector)
        if logits.shape[:1] != x.shape[:1]:
            raise TargetError(
                f"the model output has batch size {logits.shape[0] if logits.ndim else 'none'} for an "
                f"input batch of {x.shape[0]}; pass output_selector= to pick the per-sample logits."
            )
        self._check_layers_ran()
        return logits

    def _score_and_differentiate(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        target_list: list[Target],
        gradients: bool,
        input_gradients: bool,
    ) -> Recording:
        """Scores of every target and one ``autograd.grad`` per target with respect to all recorded layers."""
        score_list = [target(logits) for target in target_list]
        classes = [target.class_indices(logits.detach()) for target in target_list]
        grads: dict[str, list[torch.Tensor]] = {ref.key: [] for ref in self.refs} if gradients else {}
        in_grads: list[torch.Tensor] = []
        if gradients or input_gradients:
            wrt = [self._graph[ref.key] for ref in self.refs] if gradients else []
            if input_gradients:
                wrt.append(x)
            for t, score in enumerate(score_list):
                results = _grad(score, wrt, retain=t < len(score_list) - 1)
                if gradients:
                    for ref, g in zip(self.refs, results, strict=False):
                        grads[ref.key].append(g.contiguous())
                if input_gradients:
                    in_grads.append(results[-1].contiguous())
        return Recording(
            layers=[ref.key for ref in self.refs],
            inputs=x.detach(),
            logits=logits.detach(),
            activations=dict(self._acts),
            gradients={k: _stack(v) for k, v in grads.items()},
            input_gradients=_stack(in_grads) if input_gradients else None,
            scores=torch.stack([s.detach() for s in score_list], dim=1),
            target_classes=torch.stack(classes, dim=1),
            target_names=[t.name for t in target_list],
            targets=list(target_list),
        )

    def forward(self, inputs: torch.Tensor, *, execution: Execution | None = None) -> torch.Tensor:
        """Run the model without recording (eval mode, no graph) and return its logits.

        Used by perturbation methods and metrics for their extra forwards.

        Args:
            inputs: The input batch.
            execution: Overrides the capture's execution (its ``memory_format``) for this call.
        """
        if execution is not None:
            as_execution(execution)
        if not self._entered:
            raise LayerError("Capture.forward() needs an active capture.")
        x = self._prepare_input(inputs)
        with torch.inference_mode():
            return to_logits(self._call_model(x, self.model, execution), self.output_selector)

    def replay(
        self,
        layer: LayerSpec,
        activations: torch.Tensor,
        sample_index: torch.Tensor | Sequence[int],
        *,
        inputs: torch.Tensor,
        logits: torch.Tensor | None = None,
        batch_budget_mb: float | None = None,
        execution: Execution | None = None,
    ) -> torch.Tensor:
        """Logits of the model when ``layer``'s output is replaced by ``activations``.

        Row ``n`` of ``activations`` replaces the layer's output for original sample ``sample_index[n]`` of
        ``inputs``. Only the part of the network after the layer is re-executed where ``torch.fx`` can trace the
        model (the traced tail is checked once against the real logits and kept in :attr:`replayer`), else full
        forwards with a temporary hook that substitutes the rows; rows run in memory-bounded chunks under
        ``torch.inference_mode``. See :mod:`cnnlens.capture.replay` and :func:`~cnnlens.capture.replay_rows`.

        Args:
            layer: The layer whose output is replaced (a name, ``name@k`` or module).
            activations: ``(N, C, h, w)`` replacement outputs (the layer's output shape per sample).
            sample_index: ``(N,)`` which original sample each row belongs to.
            inputs: ``(B, ...)`` the original model inputs (e.g. ``Recording.inputs``).
            logits: ``(B, K)`` the model's logits on ``inputs`` if known (used to verify the traced tail;
                computed with one forward when omitted).
            batch_budget_mb: Memory budget of one chunk in MiB (default: ``execution``'s, else
                :mod:`cnnlens.batching`'s).
            execution: Memory budget and chunk size of the chunks (None: the capture's execution).

        Returns:
            ``(N, K)`` logits.

        Raises:
            LayerError: Outside an active capture, or when the rows do not fit the layer's output.

        Example:
            >>> from cnnlens.capture import capture
            >>> net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
            >>> x = torch.randn(1, 3, 4, 4)
            >>> with capture(net, "0") as cap:
            ...     rec = cap.run(x, gradients=False)
            ...     out = cap.replay("0", torch.zeros(2, 2, 4, 4), [0, 0], inputs=x)
            >>> torch.allclose(out, net[3].bias.expand(2, 3))
            True
        """
        if not isinstance(activations, torch.Tensor):
            raise InputShapeError(f"activations must be a tensor (N, C, h, w), got {type(activations).__name__}.")
        index = torch.as_tensor(sample_index, dtype=torch.long, device=activations.device).reshape(-1)
        if index.shape[0] != activations.shape[0]:
            raise InputShapeError(
                f"got {activations.shape[0]} replacement rows but {index.shape[0]} sample indices; give one "
                "original-sample index per row."
            )

        def make_rows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            return activations[start:stop].clone(), index[start:stop]  # the model may modify rows in place

        return replay_rows(
            self,
            layer,
            int(activations.shape[0]),
            make_rows,
            inputs=inputs,
            logits=logits,
            batch_budget_mb=batch_budget_mb,
            execution=execution,
        )

    def _check_layers_ran(self) -> None:
        missing = [ref.key for ref in self.refs if ref.key not in self._acts]
        if missing:
            calls = {ref.key: self._calls.get(ref.module, 0) for ref in self.refs if ref.key in missing}
            detail = ", ".join(f"{key!r} (ran {n} time{'s' if n != 1 else ''})" for key, n in calls.items())
            raise LayerError(
                f"layer(s) {detail} did not produce an output in this forward; choose layers on the path the "
                "forward takes (e.g. not an unused auxiliary head), or a valid call index name@k."
            )
        if self._multi_call:
            key, n = next(iter(self._multi_call.items()))
            options = ", ".join(f"'{key}@{i}'" for i in range(n))
            raise LayerError(
                f"layer {key!r} ran {n} times in one forward (a shared module); name the call you want: {options}."
            )
