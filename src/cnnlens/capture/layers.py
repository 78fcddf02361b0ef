"""Layer resolution and layer discovery.

Dotted ``named_modules()`` names (``name@k`` for the k-th call of a shared module) with did-you-mean hints
(:func:`resolve_layer`), and one shape probe that lists every module's output (:func:`probe_layers`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnlens.capture.scope import ModelScope
from cnnlens.errors import InputShapeError, LayerError, LayerNotFoundError, ModelTypeError, OptionError

__all__ = ["LayerInfo", "LayerRef", "LayerSpec", "check_layers_ran", "check_model", "probe_layers", "resolve_layer"]

LayerSpec = str | nn.Module
"""A layer as a user names it: a dotted ``named_modules()`` path (optionally ``name@k``) or the module."""

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
    aliases = getattr(model, "cnnlens_layer_aliases", None)  # bare name -> path (Keras models)
    if name not in modules and isinstance(aliases, dict) and isinstance(aliases.get(name), str):
        name = aliases[name]
    ambiguous = getattr(model, "cnnlens_layer_ambiguous", None)  # bare name -> its several paths (Keras models)
    if name not in modules and isinstance(ambiguous, dict) and ambiguous.get(name):
        raise LayerNotFoundError(
            f"the layer name {layer!r} is ambiguous in {type(model).__name__}: it ends "
            f"{', '.join(repr(p) for p in ambiguous[name])}; pass one of these full paths."
        )
    if name == "" or name not in modules:
        candidates = [n for n in modules if n]
        if isinstance(aliases, dict):
            candidates += [a for a in aliases if isinstance(a, str)]
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise LayerNotFoundError(
            f"no layer named {layer!r} in {type(model).__name__}.{hint} List the layers with "
            "`cnnlens layers` or model.named_modules()."
        )
    return LayerRef(name, modules[name], call)


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

    Uses temporary forward hooks of a :class:`~cnnlens.capture.ModelScope` (removed in ``finally``; the model's
    training flags are restored).

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
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError) as exc:
        raise InputShapeError(f"input_size is (C, H, W) of one image, got {input_size!r}.") from exc
    if len(size) != 3 or min(size) <= 0:
        raise InputShapeError(f"input_size is (C, H, W) of one image (positive sizes), got {size}.")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    names = {m: n for n, m in model.named_modules() if n}
    seen: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    order: list[str] = []
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

    with ModelScope(model) as scope:
        for module, name in names.items():
            scope.add_forward_hook(module, make(name))
        with torch.no_grad():
            model(torch.zeros((1, *size), device=dev, dtype=dtype))
    return _infos(model, size, order, names, seen, same_as)


def _infos(
    model: nn.Module,
    size: tuple[int, ...],
    order: list[str],
    names: dict[nn.Module, str],
    seen: dict[str, tuple[tuple[int, ...] | None, int]],
    same_as: dict[str, str],
) -> list[LayerInfo]:
    """The :class:`LayerInfo` list of :func:`probe_layers` from what its hooks saw."""
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


def check_model(model: object, output_selector: object) -> None:
    """Refuse a model that is not an ``nn.Module`` or an output selector that is not callable."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if output_selector is not None and not callable(output_selector):
        raise OptionError(
            f"output_selector must be a callable (model output -> logits tensor) or None, got "
            f"{type(output_selector).__name__}."
        )


def check_layers_ran(
    refs: Sequence[LayerRef], produced: Any, calls: dict[nn.Module, int], multi_call: dict[str, int]
) -> None:
    """Refuse a forward in which a requested layer did not produce an output, or a shared one ran twice.

    Args:
        refs: The requested layers.
        produced: What the forward recorded (anything supporting ``key in produced``).
        calls: How often each module ran.
        multi_call: Layer key -> call count, for layers named without a call index that ran more than once.
    """
    missing = [ref.key for ref in refs if ref.key not in produced]
    if missing:
        counts = {ref.key: calls.get(ref.module, 0) for ref in refs if ref.key in missing}
        detail = ", ".join(f"{key!r} (ran {n} time{'s' if n != 1 else ''})" for key, n in counts.items())
        raise LayerError(
            f"layer(s) {detail} did not produce an output in this forward; choose layers on the path the "
            "forward takes (e.g. not an unused auxiliary head), or a valid call index name@k."
        )
    if multi_call:
        key, n = next(iter(multi_call.items()))
        options = ", ".join(f"'{key}@{i}'" for i in range(n))
        raise LayerError(
            f"layer {key!r} ran {n} times in one forward (a shared module); name the call you want: {options}."
        )
