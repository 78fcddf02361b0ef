"""Capture: the only place where cnnlens touches a model with hooks.

One :func:`capture` context records the outputs of many layers in one forward pass and the gradients of
one or several target scores with respect to all of them in one ``torch.autograd.grad`` call per target.
It never calls ``.backward()``: parameter ``.grad`` is never touched and no graph is kept afterwards.

Guarantees (tested by the contract tests):

* Hooks are forward hooks registered on ``__enter__`` and removed in ``finally`` on ``__exit__``, also when
  the model's forward raises.
* The model is put in eval mode for the duration and every module's ``training`` flag is restored
  afterwards; parameters' ``requires_grad`` flags are restored too.
* Recorded activations are never changed by later in-place operations (``ReLU(inplace=True)``,
  ``out += identity``): the model continues on a copy of the recorded tensor, so the recorded activation and
  the gradient are both those of the layer's own output, before any in-place change.
* Gradients are aligned with layers by name, never by the order in which they arrive.
* No autograd graph is recorded before the first target layer runs (the forward starts in no-grad mode and
  the first hooked layer switches recording on), so a capture costs little more than inference.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeGuard, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnlens.errors import CnnlensError, InputShapeError, LayerError, LayerNotFoundError, OptionError, TargetError
from cnnlens.execution import Execution, MemoryFormat, as_execution
from cnnlens.outputs import OutputSelector, to_logits
from cnnlens.targets import ClassTarget, FunctionTarget, Score, Target, TargetSpec, resolve_targets

log = logging.getLogger(__name__)

__all__ = [
    "Capture",
    "DifferentiableCapture",
    "Execution",
    "GraphRecording",
    "LayerInfo",
    "LayerRef",
    "LayerSpec",
    "MemoryFormat",
    "Probe",
    "Recording",
    "ReluBackward",
    "capture",
    "differentiable_capture",
    "forward_only",
    "probe_layers",
    "record",
    "replay_path",
    "replay_rows",
    "resolve_layer",
]

LayerSpec = str | nn.Module

_CALL_RE = re.compile(r"^(?P<name>.*)@(?P<call>\d+)$")


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: its dotted name, the module and which call of it is meant.

    ``call`` is ``None`` for a module run once per forward; ``"name@k"`` selects the k-th call of a module
    that runs several times (shared modules).
    """

    name: str
    module: nn.Module
    call: int | None = None

    @property
    def key(self) -> str:
        """The name under which the layer's tensors are stored."""
        return self.name if self.call is None else f"{self.name}@{self.call}"


def resolve_layer(model: nn.Module, layer: LayerSpec, *, modules: dict[str, nn.Module] | None = None) -> LayerRef:
    """Resolve a dotted ``named_modules()`` path (optionally ``@k``) or a module to a :class:`LayerRef`.

    Args:
        model: The network.
        layer: A dotted name such as ``"layer4.2.conv3"``, ``"features.28"``, ``"blocks.3@1"`` (second
            call of a shared module), or a module object that belongs to ``model``.
        modules: ``dict(model.named_modules())`` when the caller already has it (resolving many layers).

    Returns:
        The resolved layer.

    Raises:
        LayerNotFoundError: With close matches ("did you mean") when the name is unknown.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> resolve_layer(net, "0").name
        '0'
    """
    if modules is None:
        modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for found, module in modules.items():
            if module is layer:
                return LayerRef(found, layer)
        raise LayerNotFoundError(
            f"the module {type(layer).__name__} passed as a layer is not part of the model; pass a module "
            "from model.named_modules() or its dotted name."
        )
    if not isinstance(layer, str):
        raise LayerNotFoundError(f"a layer is a dotted name or a module, got {type(layer).__name__}.")
    call: int | None = None
    name = layer
    match = _CALL_RE.match(layer)
    if match:
        name, call = match["name"], int(match["call"])
    if name == "" or name not in modules:
        candidates = [n for n in modules if n]
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise LayerNotFoundError(
            f"no layer named {layer!r} in {type(model).__name__}.{hint} List the layers with "
            "`cnnlens layers` or model.named_modules()."
        )
    return LayerRef(name, modules[name], call)


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


class _RectifierOverride(TorchFunctionMode):
    """Routes every ReLU and ReLU6 of a forward (modules, functional, in-place) through the chosen backward rule.

    In-place calls return a new tensor instead of modifying their input; code that relies on the side effect
    of a discarded ``x.relu_()`` result is not supported.
    """

    def __init__(self, mode: str) -> None:
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


@dataclass
class Recording:
    """What one captured forward/backward produced.

    Attributes:
        layers: The layer keys in the order requested.
        inputs: The model input ``(B, C, H, W)`` (detached).
        logits: The model's logits ``(B, K)`` (detached).
        activations: Layer key -> output ``(B, C, h, w)``, detached, never modified in place later.
        gradients: Layer key -> ``(T, B, C, h, w)`` gradients of each target's score; empty when
            gradients were not requested.
        input_gradients: ``(T, B, C, H, W)`` gradients of each score with respect to the input, or None.
        scores: ``(B, T)`` the target scores.
        target_classes: ``(B, T)`` the class index each target explains (``-1`` for custom targets).
        target_names: One readable name per target.
    """

    layers: list[str]
    inputs: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    input_gradients: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    target_classes: torch.Tensor | None = None
    target_names: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    @property
    def num_targets(self) -> int:
        """How many targets were explained per sample."""
        return 0 if self.scores is None else int(self.scores.shape[1])


class Capture:
    """The state of one :func:`capture` context; see the module docstring for its guarantees."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec],
        *,
        output_selector: OutputSelector | None = None,
        execution: Execution | None = None,
    ) -> None:
        self.execution = as_execution(execution)
        self.model = model
        self._modules = dict(model.named_modules())  # one traversal serves resolution and the flag check
        refs = [resolve_layer(model, layer, modules=self._modules) for layer in layers]
        seen: set[str] = set()
        self.refs: list[LayerRef] = []
        for ref in refs:
            if ref.key not in seen:
                seen.add(ref.key)
                self.refs.append(ref)
        self.output_selector = output_selector
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._training: dict[nn.Module, bool] = {}
        self._requires_grad: dict[nn.Parameter, bool] = {}
        self._entered = False
        # Per-forward state.
        self._recording = False
        self._record_graph = False
        self._calls: dict[nn.Module, int] = {}
        self._graph: dict[str, torch.Tensor] = {}
        self._acts: dict[str, torch.Tensor] = {}
        self._multi_call: dict[str, int] = {}

    # -- context management -------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._entered:
            raise LayerError("this capture is already active; open a new capture() instead of re-entering it.")
        # Only a model with modules in training mode is switched (and snapshotted): eval() rewrites the flag
        # of every module through nn.Module.__setattr__, a millisecond on a model of a few hundred modules.
        if any(m.training for m in self._modules.values()):
            self._training = {m: m.training for m in self._modules.values()}
        try:
            if self._training:
                self.model.eval()
            by_module: dict[nn.Module, list[LayerRef]] = {}
            for ref in self.refs:
                by_module.setdefault(ref.module, []).append(ref)
            for module, refs in by_module.items():
                self._handles.append(module.register_forward_hook(self._make_hook(module, refs)))
        except BaseException:
            self._restore()
            raise
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
        """``call(x)``, in channels-last memory format when the execution asks for it (4-D CPU float input).

        ``Execution(memory_format="channels_last")`` (an explicit speed option; the default is
        ``"contiguous"``) runs a 4-D floating-point input on the CPU in channels-last format: oneDNN's
        convolutions are 1.2-1.6x faster that way (measured on ResNet-50, VGG16, InceptionV3 and
        EfficientNet-Lite0), but PyTorch/oneDNN's channels-last convolution backward on the CPU is measurably
        less accurate: against a float64 reference, ResNet-50 (weights=None, 224 px) guided backprop 1.1e-4
        relative error vs 2.6e-7 contiguous, saliency 3.7e-2 vs 2.1e-3, InceptionV3 ``Mixed_6e`` Grad-CAM
        2.2e-4 vs 1.9e-6 (depending on the CPU's kernel set; ``tests/test_accuracy.py``). Nothing is retried:
        a model that cannot run channels-last (typically a ``.view()`` of a feature map) fails once, with an
        :class:`~cnnlens.errors.OptionError` that names the fix and keeps the model's error as ``__cause__``.
        """
        chosen = execution if execution is not None else self.execution
        if not _wants_channels_last(x, chosen):
            return call(x)
        try:
            return call(x.contiguous(memory_format=torch.channels_last))
        except CnnlensError:
            raise
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            raise OptionError(
                f"{type(self.model).__name__} failed in channels-last memory format "
                f"(Execution(memory_format='channels_last')): {type(exc).__name__}: {exc}. A model that reshapes "
                "feature maps with .view() cannot run channels-last: pass execution=Execution(memory_format="
                "'contiguous') (the default), or fix the model (.reshape instead of .view)."
            ) from exc

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
        """
        if not self._entered:
            raise LayerError("Capture.run() needs an active capture: use `with capture(model, layers) as cap:`.")
        if relu_backward not in ("normal", "guided", "deconvnet"):
            raise TargetError(f"relu_backward must be 'normal', 'guided' or 'deconvnet', got {relu_backward!r}.")
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

            def attempt(inp: torch.Tensor) -> Any:
                self._clear()
                torch.set_grad_enabled(input_gradients)
                if relu_backward == "normal":
                    return self.model(inp)
                override = _RectifierOverride(relu_backward)
                with override:
                    out = self.model(inp)
                if override.count == 0:
                    raise LayerError(
                        f"relu_backward={relu_backward!r} found no ReLU or ReLU6 in {type(self.model).__name__}'s "
                        "forward; guided backprop and deconvnet are defined for rectifier networks only."
                    )
                return out

            output = self._call_model(x, attempt)
            logits = to_logits(output, self.output_selector)
            if logits.shape[:1] != x.shape[:1]:
                raise TargetError(
                    f"the model output has batch size {logits.shape[0] if logits.ndim else 'none'} for an "
                    f"input batch of {x.shape[0]}; pass output_selector= to pick the per-sample logits."
                )
            self._check_layers_ran()
            torch.set_grad_enabled(need_grad)
            score_list = [target(logits) for target in target_list]
            classes = [target.class_indices(logits.detach()) for target in target_list]
            grads: dict[str, list[torch.Tensor]] = {ref.key: [] for ref in self.refs} if gradients else {}
            in_grads: list[torch.Tensor] = []
            if need_grad:
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
            recording = Recording(
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
        finally:
            torch.set_grad_enabled(prev_grad)
            self._recording = False
            self._record_graph = False
            self._clear()
        return recording

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
    ) -> torch.Tensor:
        """Logits of the model when ``layer``'s output is replaced by ``activations``.

        Row ``n`` of ``activations`` replaces the layer's output for original sample ``sample_index[n]`` of
        ``inputs``. Where ``torch.fx`` can trace the model, only the part of the network after the layer is
        re-executed (values it needs from before the layer, such as a residual identity, are computed once
        from ``inputs`` and indexed by ``sample_index``); the traced tail is checked once against the real
        logits and cached per layer in this capture. Otherwise every row runs a full forward of its original
        input with a temporary forward hook that substitutes the row (removed in ``finally``). Rows run in
        memory-bounded chunks (:mod:`cnnlens.batching`) under ``torch.inference_mode``. See
        :func:`replay_rows` for rows built lazily, and the "Replay" section at the end of this module.

        Args:
            layer: The layer whose output is replaced (a name, ``name@k`` or module).
            activations: ``(N, C, h, w)`` replacement outputs (the layer's output shape per sample).
            sample_index: ``(N,)`` which original sample each row belongs to.
            inputs: ``(B, ...)`` the original model inputs (e.g. ``Recording.inputs``).
            logits: ``(B, K)`` the model's logits on ``inputs`` if known (used to verify the traced tail;
                computed with one forward when omitted).
            batch_budget_mb: Memory budget of one chunk in MiB (default: :mod:`cnnlens.batching`).

        Returns:
            ``(N, K)`` logits.

        Raises:
            LayerError: Outside an active capture, or when the rows do not fit the layer's output.

        Example:
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


def _wants_channels_last(x: torch.Tensor, execution: Execution) -> bool:
    return (
        execution.channels_last
        and x.ndim == 4
        and x.device.type == "cpu"
        and x.is_floating_point()
        and not x.is_contiguous(memory_format=torch.channels_last)
    )


class Probe:
    """Extra passes for methods that need more than the recorded forward and backward.

    A probe belongs to one active :class:`Capture` and one :class:`Recording`. Its targets are *fixed*: a
    class target explains, on any new input (noisy copies, interpolation steps, masked images), the class
    that was explained on the original input, never a re-ranked one. Results of gradient passes are cached
    per (rule, target), so guided backprop and guided Grad-CAM requested together cost one extra pass.
    """

    def __init__(self, cap: Capture, recording: Recording, targets: Sequence[Target]) -> None:
        self.cap = cap
        self.recording = recording
        self.targets = [_fix_target(t, recording, i) for i, t in enumerate(targets)]
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def logits(self, inputs: torch.Tensor, *, execution: Execution | None = None) -> torch.Tensor:
        """Logits of ``inputs`` (no graph, eval mode, hooks silent); see :meth:`Capture.forward`."""
        return self.cap.forward(inputs, execution=execution)

    def scores(self, logits: torch.Tensor, t: int, sample_index: torch.Tensor) -> torch.Tensor:
        """Score of target ``t`` for rows of ``logits`` that are variants of samples ``sample_index``.

        Args:
            logits: ``(N, K)`` logits of N perturbed inputs.
            t: Which target.
            sample_index: ``(N,)`` the original sample each row derives from.

        Returns:
            ``(N,)`` scores, each of the class explained for its original sample.
        """
        target = self.targets[t]
        if isinstance(target, ClassTarget):
            classes = torch.as_tensor(
                target.classes
                if isinstance(target.classes, tuple)
                else [target.classes] * self.recording.inputs.shape[0],
                device=logits.device,
            )
            return ClassTarget(tuple(int(c) for c in classes[sample_index].tolist()), target.score)(logits)
        return target(logits)

    def input_gradient(self, inputs: torch.Tensor, t: int, *, relu_backward: ReluBackward = "normal") -> torch.Tensor:
        """D score_t / d input on new ``inputs`` (same batch layout as the recording), with the given ReLU rule."""
        rec = self.cap.run(
            inputs, [self.targets[t]], gradients=False, input_gradients=True, relu_backward=relu_backward
        )
        assert rec.input_gradients is not None  # requested above
        return rec.input_gradients[0]

    def cached_input_gradient(self, t: int, relu_backward: ReluBackward) -> torch.Tensor:
        """:meth:`input_gradient` on the recorded input, computed once per (rule, target)."""
        key = (relu_backward, t)
        if key not in self._cache:
            if relu_backward == "normal" and self.recording.input_gradients is not None:
                self._cache[key] = self.recording.input_gradients[t]
            else:
                self._cache[key] = self.input_gradient(self.recording.inputs, t, relu_backward=relu_backward)
        return self._cache[key]

    def rerun(
        self,
        inputs: torch.Tensor,
        *,
        gradients: bool = True,
        input_gradients: bool = False,
        relu_backward: ReluBackward = "normal",
    ) -> Recording:
        """Re-run the capture on new ``inputs`` (same batch layout) with the fixed targets."""
        return self.cap.run(
            inputs,
            list(self.targets),
            gradients=gradients,
            input_gradients=input_gradients,
            relu_backward=relu_backward,
        )

    def replay_rows(
        self,
        layer: LayerSpec,
        n_rows: int,
        make_rows: RowSource,
        *,
        batch_budget_mb: float | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Logits with ``layer``'s output replaced, for rows built lazily (see :func:`replay_rows`).

        The original inputs and logits are the recording's, so only ``make_rows(start, stop) ->
        (activations, sample_index)`` is needed; at most one chunk of rows exists at a time.
        """
        return replay_rows(
            self.cap,
            layer,
            n_rows,
            make_rows,
            inputs=self.recording.inputs,
            logits=self.recording.logits,
            reference=self.recording.activations,
            batch_budget_mb=batch_budget_mb,
            chunk_size=chunk_size,
        )

    def memo(self, key: Hashable, compute: Callable[[], _T]) -> _T:
        """``compute()`` once per ``key`` for the life of this probe (e.g. extra forwards shared by targets).

        Perturbation methods keep their extra forwards here, so explaining the top-3 classes of an image costs
        one set of masked or ablated forwards, not three.
        """
        store: dict[Hashable, Any] = self.__dict__.setdefault("_memo", {})
        if key not in store:
            store[key] = compute()
        value: _T = store[key]
        return value


def _fix_target(target: Target, recording: Recording, t: int) -> Target:
    """Freeze a ranked target to the classes it picked on the recorded input."""
    if isinstance(target, ClassTarget | FunctionTarget):
        return target
    assert recording.target_classes is not None  # set by Capture.run
    classes = recording.target_classes[:, t]
    score: Score = getattr(target, "score", "logit")
    if bool((classes < 0).any()):
        return target
    return ClassTarget(tuple(int(c) for c in classes.tolist()), score)


def _is_target_list(targets: object) -> TypeGuard[list[Target]]:
    return isinstance(targets, list) and bool(targets) and all(isinstance(t, Target) for t in targets)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` along a new dim 0, without copying when there is one tensor (a view then)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _grad(score: torch.Tensor, wrt: list[torch.Tensor], *, retain: bool) -> list[torch.Tensor]:
    """Gradients of ``score.sum()`` with respect to ``wrt``; zeros where the score does not depend on one."""
    if not score.requires_grad:
        return [torch.zeros_like(w) for w in wrt]
    results = torch.autograd.grad(score.sum(), wrt, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(results, wrt, strict=True)]


def capture(
    model: nn.Module,
    layers: Sequence[LayerSpec] | LayerSpec,
    *,
    output_selector: OutputSelector | None = None,
    execution: Execution | None = None,
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
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not layers:
        raise LayerNotFoundError("no layer given; name at least one layer (see `cnnlens layers`).")
    return Capture(model, list(layers), output_selector=output_selector, execution=execution)


def record(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[LayerSpec] | LayerSpec,
    targets: TargetSpec = None,
    *,
    top_k: int | None = None,
    gradients: bool = True,
    input_gradients: bool = False,
    relu_backward: ReluBackward = "normal",
    output_selector: OutputSelector | None = None,
) -> Recording:
    """One-shot :func:`capture`: open, run once, close.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> record(net, torch.randn(1, 3, 8, 8), "0").activations["0"].shape
        torch.Size([1, 4, 6, 6])
    """
    with capture(model, layers, output_selector=output_selector) as cap:
        return cap.run(
            inputs,
            targets,
            top_k=top_k,
            gradients=gradients,
            input_gradients=input_gradients,
            relu_backward=relu_backward,
        )


@dataclass(frozen=True)
class LayerInfo:
    """A module's output as seen in one probe forward.

    Attributes:
        name: Dotted module name.
        type: The module's class name.
        shape: Output shape without the batch dimension, or None when the output is not a tensor.
        stride: Input height divided by output height for 4-D outputs, else None.
        calls: How many times the module ran in the forward.
        params: Number of parameters owned directly by the module (not its children).
        same_as: The module that ran earlier and returned this very tensor, unchanged since (no in-place op
            in between): a container and its last child (``layer4`` and ``layer4.2``), an ``Identity``.
            Explaining either gives the same maps. None when the output is a tensor of its own.
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    stride: int | None
    calls: int
    params: int
    same_as: str | None = None


def probe_layers(
    model: nn.Module, input_size: tuple[int, int, int] | Sequence[int], *, device: str | None = None
) -> list[LayerInfo]:
    """Run one forward on a zero image and list every module's output shape and stride, in execution order.

    Uses temporary forward hooks removed in ``finally``; the model's training flags are restored.

    Args:
        model: The network.
        input_size: ``(C, H, W)`` of one input image.
        device: Where to run; default: the model's parameters' device.

    Returns:
        One :class:`LayerInfo` per module that ran (modules that did not run come last, with ``calls=0``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        >>> [(i.name, i.shape, i.stride) for i in probe_layers(net, (3, 8, 8))]
        [('0', (4, 4, 4), 2), ('1', (4, 4, 4), 2)]
    """
    size = tuple(int(v) for v in input_size)
    if len(size) != 3:
        raise InputShapeError(f"input_size is (C, H, W) of one image, got {size}.")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    names = {m: n for n, m in model.named_modules() if n}
    seen: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    order: list[str] = []
    handles = []
    training = {m: m.training for m in model.modules()}
    # (id, version) of each output tensor -> the first module that returned it; the tensors are kept alive
    # for the probe so that an id is never reused. Version counters need no_grad, not inference mode.
    producers: dict[tuple[int, int], str] = {}
    same_as: dict[str, str] = {}
    alive: list[torch.Tensor] = []

    def make(name: str) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
            if name in seen:
                prev_shape, calls = seen[name]
                seen[name] = (prev_shape, calls + 1)
                same_as.pop(name, None)  # ran twice: no single twin
            else:
                seen[name] = (shape, 1)
                order.append(name)
                if isinstance(output, torch.Tensor):
                    key = (id(output), int(output._version))
                    first = producers.setdefault(key, name)
                    if first != name:
                        same_as[name] = first
                    alive.append(output)

        return hook

    try:
        model.eval()
        for module, name in names.items():
            handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            model(torch.zeros((1, *size), device=dev, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
    infos = []
    by_name = dict(model.named_modules())
    for name in order + [n for n in names.values() if n not in seen]:
        shape, calls = seen.get(name, (None, 0))
        stride = size[1] // shape[1] if shape is not None and len(shape) == 3 and shape[1] > 0 else None
        module = by_name[name]
        twin = same_as.get(name)
        infos.append(
            LayerInfo(
                name=name,
                type=type(module).__name__,
                shape=shape,
                stride=stride,
                calls=calls,
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                same_as=twin if twin is not None and calls == 1 and seen[twin][1] == 1 else None,
            )
        )
    return infos


# =====================================================================================================
# Replay: re-run the network after a layer with replaced activations (Ablation-CAM, faithfulness metrics).
#
# Owned by the perturbation-methods work. Two paths, chosen per (capture, layer) and cached in the
# capture:
#
# * "fx": the model is traced with torch.fx (the target module kept as one leaf call); the graph is cut at
#   the target's node. The *head* (everything up to the target, plus later nodes that do not depend on it
#   when no in-place op makes moving them unsafe) runs once on the original inputs and yields the values
#   the *tail* needs; the tail runs on the replacement rows, with those values indexed by sample_index.
#   On first use for an input batch the tail is run on the unmodified activations and must reproduce the
#   real logits (max abs diff <= 1e-4 * (1 + max |logit|) in float32/64, 1e-2 * (...) in half precision),
#   otherwise the layer switches to the hook path for good.
# * "hooks": full forwards of the original inputs indexed by sample_index, with a temporary forward hook
#   on the layer that returns the replacement rows (removed in finally).
# =====================================================================================================

_T = TypeVar("_T")

RowSource = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``make_rows(start, stop) -> (activations (n, C, h, w), sample_index (n,))`` for rows start..stop-1.

The rows belong to the replay from then on: the model may modify them in place (``ReLU(inplace=True)``,
``out += identity`` after the layer), and a source may reuse one buffer for successive chunks.
"""

_INPLACE_FUNCTIONS = {
    "iadd",
    "isub",
    "imul",
    "itruediv",
    "ifloordiv",
    "imod",
    "ipow",
    "iand",
    "ior",
    "ixor",
    "ilshift",
    "irshift",
    "imatmul",
    "setitem",
}


@dataclass
class _TailPlan:
    """How one layer is replayed in one capture."""

    kind: Literal["fx", "hooks"]
    reason: str = ""
    head: Any = None  # torch.fx.GraphModule: inputs -> (*saved, target value)
    tail: Any = None  # torch.fx.GraphModule: (activation, *saved) -> model output
    inputs: tuple[Any, ...] | None = None  # key of the inputs the saved values belong to
    saved: list[torch.Tensor] = field(default_factory=list)
    per_row_bytes: int = 0
    measured_for: tuple[Any, ...] | None = None  # key of the inputs per_row_bytes was measured with
    held: torch.Tensor | None = None  # keeps those inputs' storage alive, so their key stays unique
    act_shape: tuple[int, ...] = ()  # the layer's output shape per sample (fx path)
    n_saved: int = 0  # how many values from before the layer the tail needs (fx path)


class _LeafTracer:
    """Builds an fx tracer that keeps one named module as a single call (imported lazily)."""

    @staticmethod
    def trace(model: nn.Module, leaf: str) -> Any:
        import torch.fx

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
                return module_qualified_name == leaf or super().is_leaf_module(m, module_qualified_name)

        graph = Tracer().trace(model)
        return torch.fx.GraphModule(model, graph)


def _mutates(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether an fx node modifies its first argument in place."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(
            name in _INPLACE_FUNCTIONS
            or node.kwargs.get("inplace", False)
            or (name.endswith("_") and not name.startswith("_"))
        )
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    return False


def _split_graph(gm: Any, ref: LayerRef) -> tuple[Any, Any, list[Any]] | str:
    """Cut a traced model at ``ref``'s node: (head module, tail module, saved head nodes) or why not."""
    import torch.fx

    graph = gm.graph
    nodes = list(graph.nodes)
    hits = [n for n in nodes if n.op == "call_module" and n.target == ref.name]
    wanted = ref.call if ref.call is not None else 0
    if not hits:
        return f"the traced graph has no call of {ref.name!r} (it is inlined or inside a library leaf module)"
    if (ref.call is None and len(hits) > 1) or wanted >= len(hits):
        return f"{ref.name!r} is called {len(hits)} times in the traced graph"
    target = hits[wanted]
    pos = nodes.index(target)
    before = nodes[: pos + 1]
    after = [n for n in nodes[pos + 1 :] if n.op != "output"]
    output = next(n for n in nodes if n.op == "output")
    modules = dict(gm.named_modules())
    depends = {target}
    for node in after:
        if any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    movable = [n for n in after if n not in depends and n.op not in ("placeholder", "output")]
    # Moving independent nodes into the head is unsafe when an in-place op mutates a value read on both
    # sides of the cut (the order of the read and the write would change).
    for node in after:
        if _mutates(node, modules) and node.args and isinstance(node.args[0], torch.fx.Node):
            readers = set(node.args[0].users) | {node}
            sides = {r in depends for r in readers if r in after or r is target}
            if len(sides) > 1:
                movable = []
                break
    head_set = set(before) | set(movable)
    tail_nodes = [n for n in after if n not in head_set]
    needed: list[Any] = []
    for node in [*tail_nodes, output]:
        for arg in node.all_input_nodes:
            if arg in head_set and arg is not target and arg not in needed:
                needed.append(arg)
    saved = [n for n in needed if n.op != "get_attr"]
    consts = [n for n in needed if n.op == "get_attr"]

    head = torch.fx.Graph()
    env: dict[Any, Any] = {}
    for node in nodes:
        if node in head_set:
            env[node] = head.node_copy(node, lambda a: env[a])
    head.output((*[env[n] for n in saved], env[target]))

    tail = torch.fx.Graph()
    tenv: dict[Any, Any] = {target: tail.placeholder("replaced_activation")}
    for i, node in enumerate(saved):
        tenv[node] = tail.placeholder(f"saved_{i}")
    for node in consts:
        tenv[node] = tail.node_copy(node, lambda a: tenv[a])
    for node in tail_nodes:
        tenv[node] = tail.node_copy(node, lambda a: tenv[a])
    tail.output(torch.fx.node.map_arg(output.args[0], lambda a: tenv[a]))
    return torch.fx.GraphModule(gm, head), torch.fx.GraphModule(gm, tail), saved


def _input_key(x: torch.Tensor) -> tuple[Any, ...]:
    """Identifies an input batch (same storage, shape, dtype and no in-place change since)."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x._version)


def _tolerance(reference: torch.Tensor) -> float:
    scale = 1.0 + float(reference.detach().abs().max()) if reference.numel() else 1.0
    return (1e-4 if reference.element_size() >= 4 else 1e-2) * scale


class _Replayer:
    """Per-capture replay state: one :class:`_TailPlan` per layer key."""

    def __init__(self, cap: Capture) -> None:
        self.cap = cap
        self.plans: dict[str, _TailPlan] = {}

    def plan(self, ref: LayerRef) -> _TailPlan:
        plan = self.plans.get(ref.key)
        if plan is None:
            plan = self._trace(ref)
            self.plans[ref.key] = plan
        return plan

    def _trace(self, ref: LayerRef) -> _TailPlan:
        try:
            gm = _LeafTracer.trace(self.cap.model, ref.name)
            split = _split_graph(gm, ref)
        except Exception as exc:  # any tracing failure means: use the hook path (reason kept)
            return _TailPlan("hooks", reason=f"torch.fx could not trace the model: {type(exc).__name__}: {exc}")
        if isinstance(split, str):
            return _TailPlan("hooks", reason=split)
        head, tail, saved = split
        return _TailPlan("fx", head=head, tail=tail, n_saved=len(saved))

    def _fallback(self, plan: _TailPlan, reason: str) -> None:
        import logging

        logging.getLogger(__name__).debug("replay falls back to full forwards: %s", reason)
        plan.kind, plan.reason, plan.head, plan.tail, plan.saved = "hooks", reason, None, None, []
        plan.inputs, plan.per_row_bytes, plan.measured_for = None, 0, None

    def prepare(
        self,
        ref: LayerRef,
        inputs: torch.Tensor,
        logits: torch.Tensor | None,
        reference: torch.Tensor | None,
        example: tuple[torch.Tensor, torch.Tensor],
    ) -> _TailPlan:
        """Compute the saved head values for ``inputs`` (once), check the tail, measure one row's footprint."""
        from cnnlens.batching import measure_peak_bytes

        plan = self.plan(ref)
        device = inputs.device
        row, row_index = example
        key = _input_key(inputs)
        if plan.kind == "fx" and plan.inputs != key:
            problem = self._check_tail(plan, inputs, logits, reference)
            if problem:
                self._fallback(plan, problem)
            else:
                plan.inputs = key
        if plan.measured_for != key:
            run = lambda: self.run(ref, plan, inputs, row.clone(), row_index)  # noqa: E731
            with torch.inference_mode():
                try:
                    peak = measure_peak_bytes(run, device)
                except LayerError:
                    raise
                except Exception as exc:
                    if plan.kind != "fx":
                        raise
                    self._fallback(plan, f"the traced tail failed on a replacement row: {type(exc).__name__}: {exc}")
                    peak = measure_peak_bytes(run, device)
            extra = sum(v[:1].nelement() * v.element_size() for v in plan.saved)
            if plan.kind == "hooks":
                extra += inputs[:1].nelement() * inputs.element_size()
            plan.per_row_bytes = max(1, peak + 2 * row[:1].nelement() * row.element_size() + extra)
            plan.measured_for = key
        plan.held = inputs
        return plan

    def _check_tail(
        self, plan: _TailPlan, inputs: torch.Tensor, logits: torch.Tensor | None, reference: torch.Tensor | None
    ) -> str:
        """Run the head on ``inputs`` and check the tail on the unmodified activations; '' when all is well."""
        try:
            if plan.n_saved == 0 and reference is not None:
                values: list[Any] = [reference]  # the tail needs nothing else: no head run
            else:
                with torch.inference_mode():
                    out = plan.head(inputs)
                values = list(out) if isinstance(out, tuple) else [out]
            saved, head_act = values[:-1], values[-1]
            batch = int(inputs.shape[0])
            if not all(isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch for v in saved):
                return "the tail needs values from before the layer that are not per-sample tensors"
            if not isinstance(head_act, torch.Tensor):
                return "the traced layer output is not a tensor"
            if reference is not None and (
                reference.shape != head_act.shape or float((reference - head_act).abs().max()) > _tolerance(reference)
            ):
                return "the traced head does not reproduce the recorded activation"
            real = logits if logits is not None else self.cap.forward(inputs)
            idx = torch.arange(batch, device=inputs.device)
            with torch.inference_mode():
                got = to_logits(
                    plan.tail(head_act.clone(), *[v.index_select(0, idx) for v in saved]), self.cap.output_selector
                )
            if got.shape != real.shape or float((got - real).abs().max()) > _tolerance(real):
                return "the traced tail does not reproduce the model's logits"
        except Exception as exc:  # a traced graph that cannot run here: use the hook path (reason kept)
            return f"the traced graph failed to run: {type(exc).__name__}: {exc}"
        plan.saved = saved
        plan.act_shape = tuple(head_act.shape[1:])
        return ""

    def hooked(self, ref: LayerRef, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Full forward of ``x`` with ``ref``'s output replaced by ``rows`` (hook removed in finally)."""
        state = {"call": 0}
        wanted = ref.call if ref.call is not None else 0

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            call = state["call"]
            state["call"] = call + 1
            if call != wanted:
                return None
            if not isinstance(output, torch.Tensor) or tuple(output.shape) != tuple(rows.shape):
                got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise LayerError(
                    f"replacement activations for layer {ref.key!r} have shape {tuple(rows.shape)}, but the "
                    f"layer outputs {got} for these inputs; give rows shaped like the layer's output."
                )
            return rows.to(dtype=output.dtype)

        handle = ref.module.register_forward_hook(hook)
        try:
            with torch.inference_mode():
                return to_logits(self.cap.model(x), self.cap.output_selector)
        finally:
            handle.remove()

    def run(
        self, ref: LayerRef, plan: _TailPlan, inputs: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Logits for one chunk of rows (which the model may modify in place: pass rows you own)."""
        if plan.kind == "fx":
            if tuple(rows.shape[1:]) != plan.act_shape:
                raise LayerError(
                    f"replacement activations for layer {ref.key!r} have shape {tuple(rows.shape)}, but the "
                    f"layer outputs {(rows.shape[0], *plan.act_shape)} for these inputs; give rows shaped like "
                    "the layer's output."
                )
            with torch.inference_mode():
                out = plan.tail(rows, *[v.index_select(0, index) for v in plan.saved])
            return to_logits(out, self.cap.output_selector)
        return self.hooked(ref, inputs.index_select(0, index), rows)


def _replayer(cap: Capture) -> _Replayer:
    state = cap.__dict__.get("_replayer")
    if not isinstance(state, _Replayer):
        state = _Replayer(cap)
        cap.__dict__["_replayer"] = state
    return state


def replay_path(cap: Capture, layer: LayerSpec) -> tuple[str, str]:
    """Which replay path ``cap`` uses for ``layer`` and why: ``("fx", "")`` or ``("hooks", reason)``.

    The path may change from "fx" to "hooks" on first use if the traced tail fails its check.
    """
    plan = _replayer(cap).plan(resolve_layer(cap.model, layer))
    return plan.kind, plan.reason


def replay_rows(
    cap: Capture,
    layer: LayerSpec,
    n_rows: int,
    make_rows: RowSource,
    *,
    inputs: torch.Tensor,
    logits: torch.Tensor | None = None,
    reference: dict[str, torch.Tensor] | torch.Tensor | None = None,
    batch_budget_mb: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Logits with ``layer``'s output replaced, for ``n_rows`` rows built lazily by ``make_rows``.

    The engine behind :meth:`Capture.replay` and :meth:`Probe.replay_rows` (see the section comment above
    for the two paths). Rows are built and run one chunk at a time; the chunk size is the largest that fits
    the budget given the measured per-row footprint, tuned for throughput (:mod:`cnnlens.batching`).

    Args:
        cap: An active capture.
        layer: The layer whose output is replaced.
        n_rows: How many rows.
        make_rows: ``make_rows(start, stop) -> (activations, sample_index)``.
        inputs: The original inputs ``(B, ...)``.
        logits: The model's logits on ``inputs`` if known.
        reference: The recorded activations (a dict by layer key, or the layer's tensor) if known.
        batch_budget_mb: Memory budget of one chunk in MiB (None: the device default).
        chunk_size: A fixed chunk size (None: tuned).

    Returns:
        ``(n_rows, K)`` logits (an empty ``(0, 0)`` tensor when ``n_rows`` is 0).

    Raises:
        LayerError: Outside an active capture, or when rows do not fit the layer.
        InputShapeError: When a sample index is out of range.
    """
    from cnnlens.batching import chunk_size as fit_chunk
    from cnnlens.batching import resolve_budget, run_in_chunks, tuner_for

    if not cap._entered:
        raise LayerError("replay needs an active capture: use `with capture(model, layers) as cap:`.")
    ref = resolve_layer(cap.model, layer)
    x = cap._prepare_input(inputs)
    if n_rows <= 0:
        return torch.zeros(0, 0, device=x.device)
    act_ref = reference.get(ref.key) if isinstance(reference, dict) else reference
    replayer = _replayer(cap)
    batch = int(x.shape[0])
    budget = resolve_budget(batch_budget_mb, x.device)

    def make(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, index = make_rows(start, stop)
        index = torch.as_tensor(index, dtype=torch.long, device=x.device).reshape(-1)
        if index.shape[0] != rows.shape[0]:
            raise InputShapeError(f"make_rows gave {rows.shape[0]} rows but {index.shape[0]} sample indices.")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
            raise InputShapeError(
                f"sample indices must lie in 0..{batch - 1} (the original batch), got "
                f"{int(index.min())}..{int(index.max())}."
            )
        return rows.to(device=x.device), index

    plan = replayer.prepare(ref, x, logits, act_ref, make(0, 1))

    def work(chunk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return replayer.run(ref, plan, x, chunk[0], chunk[1])

    per_row = plan.per_row_bytes
    max_chunk = fit_chunk(per_row, budget, n_items=n_rows)
    tuner = tuner_for(
        cap.model,
        ("replay", ref.key, plan.kind, tuple(x.shape[1:]), x.dtype, str(x.device), budget),
        fit_chunk(per_row, budget),
    )
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None
    parts = run_in_chunks(work, n_rows, make, max_chunk=max_chunk, chunk=chunk_size, tuner=tuner, sync=sync)
    return torch.cat(parts, dim=0)


# =====================================================================================================
# Differentiable capture: recorded activations that keep their autograd graph to the input.
#
# Owned by the forward-views work (activation maximisation, cnnlens.views.maximize). A small addition that
# reuses Capture's hooks and restore machinery unchanged: a subclass whose run keeps the graph from the
# caller's input (for example an image parameterisation) through the recorded layers, so an objective on
# the activations can be differentiated with torch.autograd.grad with respect to the caller's own tensors.
# Same guarantees as Capture: handles removed in finally, eval mode for the call and every module's
# training flag restored, every requires_grad flag restored. In addition, every parameter's requires_grad
# is switched off while the context is open, so no graph runs through the weights: parameter .grad can
# never be written, even by a caller's .backward().
# =====================================================================================================


@dataclass
class GraphRecording:
    """What one :meth:`DifferentiableCapture.run_graph` produced: tensors still attached to the input's graph.

    Attributes:
        layers: The layer keys in the order requested.
        activations: Layer key -> output ``(B, C, h, w)``, attached to the graph of the input (the model
            continued on a copy, so later in-place operations did not change them).
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
    every parameter has ``requires_grad=False``; on exit the hooks are removed and every flag is restored,
    exactly as for :class:`Capture`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec],
        *,
        output_selector: OutputSelector | None = None,
        stop_early: bool = False,
    ) -> None:
        super().__init__(model, layers, output_selector=output_selector)
        self.stop_early = stop_early
        self._graph_run = False  # stop early only inside run_graph(), never in the inherited run()

    def __enter__(self) -> DifferentiableCapture:
        super().__enter__()
        try:
            self._requires_grad = {p: p.requires_grad for p in self.model.parameters()}
            for param in self.model.parameters():
                param.requires_grad_(False)
        except BaseException:
            self._restore()
            raise
        return self

    def _make_hook(self, module: nn.Module, refs: list[LayerRef]) -> Any:
        record_output = super()._make_hook(module, refs)

        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            result = record_output(mod, args, output)
            if self._graph_run and self.stop_early and all(ref.key in self._acts for ref in self.refs):
                raise _StopForwardSignal
            return result

        return hook

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
                activations={ref.key: self._graph[ref.key] for ref in self.refs},
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
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    return DifferentiableCapture(model, list(layers), output_selector=output_selector, stop_early=stop_early)


# =====================================================================================================
# Forward-only captures: extra forwards without any layer (faithfulness metrics).
#
# Owned by the metrics work. A Capture built with no layers registers no hook; ``Capture.forward`` then runs
# the model in eval mode under ``torch.inference_mode`` and the capture restores every module's ``training``
# flag and every parameter's ``requires_grad`` on exit, exactly as for a layered capture.
# =====================================================================================================


def forward_only(model: nn.Module, *, output_selector: OutputSelector | None = None) -> Capture:
    """Open a capture with no layers, for forwards only: use it as a context manager and call ``forward``.

    :func:`capture` insists on at least one layer because a capture is usually for recording; metrics only
    need logits of perturbed inputs with the model's state restored afterwards.

    Args:
        model: Any ``nn.Module``; its output goes through :func:`cnnlens.outputs.to_logits`.
        output_selector: Optional callable that picks the logits from the model output.

    Returns:
        A :class:`Capture` without hooks; ``forward(x)`` returns logits (eval mode, no graph).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2), nn.Dropout()).train()
        >>> with forward_only(net) as cap:
        ...     logits = cap.forward(torch.randn(1, 3, 2, 2))
        >>> logits.shape, net.training
        (torch.Size([1, 2]), True)
    """
    return Capture(model, [], output_selector=output_selector)
