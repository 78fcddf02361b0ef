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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnlens.errors import InputShapeError, LayerError, LayerNotFoundError, TargetError
from cnnlens.outputs import OutputSelector, to_logits
from cnnlens.targets import ClassTarget, FunctionTarget, Target, TargetSpec, resolve_targets

__all__ = [
    "ReluBackward",
    "Capture", "LayerInfo", "LayerRef", "Probe", "Recording", "capture", "probe_layers", "record", "resolve_layer"]

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


def resolve_layer(model: nn.Module, layer: LayerSpec) -> LayerRef:
    """Resolve a dotted ``named_modules()`` path (optionally ``@k``) or a module to a :class:`LayerRef`.

    Args:
        model: The network.
        layer: A dotted name such as ``"layer4.2.conv3"``, ``"features.28"``, ``"blocks.3@1"`` (second
            call of a shared module), or a module object that belongs to ``model``.

    Returns:
        The resolved layer.

    Raises:
        LayerNotFoundError: With close matches ("did you mean") when the name is unknown.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> resolve_layer(net, "0").name
        '0'
    """
    names = {module: name for name, module in model.named_modules()}
    if isinstance(layer, nn.Module):
        if layer not in names:
            raise LayerNotFoundError(
                f"the module {type(layer).__name__} passed as a layer is not part of the model; pass a module "
                "from model.named_modules() or its dotted name."
            )
        return LayerRef(names[layer], layer)
    if not isinstance(layer, str):
        raise LayerNotFoundError(f"a layer is a dotted name or a module, got {type(layer).__name__}.")
    call: int | None = None
    name = layer
    match = _CALL_RE.match(layer)
    if match:
        name, call = match["name"], int(match["call"])
    modules = dict(model.named_modules())
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
    ) -> None:
        self.model = model
        refs = [resolve_layer(model, layer) for layer in layers]
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
        self._training = {m: m.training for m in self.model.modules()}
        self._requires_grad = {p: p.requires_grad for p in self.model.parameters()}
        try:
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
                module.training = flag
            for param, flag in self._requires_grad.items():
                if param.requires_grad != flag:
                    param.requires_grad_(flag)
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
            else:
                node = output.detach()
            for ref in wanted:
                if ref.call is None and call > 0:
                    self._multi_call[ref.key] = call + 1
                self._graph[ref.key] = node
                self._acts[ref.key] = node.detach()
            # The model continues on a copy, so no later in-place op can change what we recorded.
            return node.clone()

        return hook

    # -- running -----------------------------------------------------------------------------------
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
        need_grad = gradients or input_gradients
        if need_grad and torch.is_inference_mode_enabled():
            raise TargetError(
                "gradients cannot be computed inside torch.inference_mode(); call cnnlens outside it."
            )
        target_list = targets if _is_target_list(targets) else resolve_targets(targets, top_k=top_k)
        x = self._prepare_input(inputs)
        if input_gradients:
            x = x.clone().requires_grad_(True)
        self._clear()
        prev_grad = torch.is_grad_enabled()
        self._recording = True
        self._record_graph = gradients and need_grad
        if relu_backward not in ("normal", "guided", "deconvnet"):
            raise TargetError(f"relu_backward must be 'normal', 'guided' or 'deconvnet', got {relu_backward!r}.")
        try:
            torch.set_grad_enabled(input_gradients)
            if relu_backward == "normal":
                output = self.model(x)
            else:
                override = _RectifierOverride(relu_backward)
                with override:
                    output = self.model(x)
                if override.count == 0:
                    raise LayerError(
                        f"relu_backward={relu_backward!r} found no ReLU or ReLU6 in {type(self.model).__name__}'s "
                        "forward; guided backprop and deconvnet are defined for rectifier networks only."
                    )
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
                            grads[ref.key].append(g)
                    if input_gradients:
                        in_grads.append(results[-1])
            recording = Recording(
                layers=[ref.key for ref in self.refs],
                inputs=x.detach(),
                logits=logits.detach(),
                activations=dict(self._acts),
                gradients={k: torch.stack(v) for k, v in grads.items()},
                input_gradients=torch.stack(in_grads) if input_gradients else None,
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

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the model without recording (eval mode, no graph) and return its logits.

        Used by perturbation methods and metrics for their extra forwards.
        """
        if not self._entered:
            raise LayerError("Capture.forward() needs an active capture.")
        x = self._prepare_input(inputs)
        with torch.inference_mode():
            return to_logits(self.model(x), self.output_selector)

    def _check_layers_ran(self) -> None:
        missing = [ref.key for ref in self.refs if ref.key not in self._acts]
        if missing:
            calls = {ref.key: self._calls.get(ref.module, 0) for ref in self.refs if ref.key in missing}
            detail = ", ".join(
                f"{key!r} (ran {n} time{'s' if n != 1 else ''})" for key, n in calls.items()
            )
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

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of ``inputs`` (no graph, eval mode, hooks silent)."""
        return self.cap.forward(inputs)

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
                target.classes if isinstance(target.classes, tuple) else [target.classes] * self.recording.inputs.shape[0],
                device=logits.device,
            )
            return ClassTarget(tuple(int(c) for c in classes[sample_index].tolist()), target.score)(logits)
        return target(logits)

    def input_gradient(self, inputs: torch.Tensor, t: int, *, relu_backward: ReluBackward = "normal") -> torch.Tensor:
        """d score_t / d input on new ``inputs`` (same batch layout as the recording), with the given ReLU rule."""
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


def _fix_target(target: Target, recording: Recording, t: int) -> Target:
    """Freeze a ranked target to the classes it picked on the recorded input."""
    if isinstance(target, ClassTarget | FunctionTarget):
        return target
    assert recording.target_classes is not None  # set by Capture.run
    classes = recording.target_classes[:, t]
    score = getattr(target, "score", "logit")
    if bool((classes < 0).any()):
        return target
    return ClassTarget(tuple(int(c) for c in classes.tolist()), score)


def _is_target_list(targets: object) -> bool:
    return isinstance(targets, list) and bool(targets) and all(isinstance(t, Target) for t in targets)


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
) -> Capture:
    """Open a capture of ``layers`` of ``model``: use it as a context manager.

    Args:
        model: Any ``nn.Module``; its output goes through :func:`cnnlens.outputs.to_logits`.
        layers: One layer or several (dotted names, ``name@k``, or modules).
        output_selector: Optional callable that picks the logits from the model output.

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
    return Capture(model, list(layers), output_selector=output_selector)


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


def iter_layer_names(model: nn.Module) -> Iterator[str]:
    """Yield every non-root dotted module name of ``model`` in definition order."""
    for name, _ in model.named_modules():
        if name:
            yield name


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
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    stride: int | None
    calls: int
    params: int


def probe_layers(model: nn.Module, input_size: tuple[int, int, int] | Sequence[int], *, device: str | None = None) -> list[LayerInfo]:
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

    def make(name: str) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
            if name in seen:
                prev_shape, calls = seen[name]
                seen[name] = (prev_shape, calls + 1)
            else:
                seen[name] = (shape, 1)
                order.append(name)

        return hook

    try:
        model.eval()
        for module, name in names.items():
            handles.append(module.register_forward_hook(make(name)))
        with torch.inference_mode():
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
        infos.append(
            LayerInfo(
                name=name,
                type=type(module).__name__,
                shape=shape,
                stride=stride,
                calls=calls,
                params=sum(p.numel() for p in module.parameters(recurse=False)),
            )
        )
    return infos
